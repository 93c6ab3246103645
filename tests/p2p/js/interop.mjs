// A js-libp2p 2.x peer for the Darkbloom interop test: dial, identify, ping, find providers.
// Usage: node interop.mjs <node-multiaddr> <dht-server-multiaddr> <model-cid>
// Prints one JSON object on stdout.
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { CID } from 'multiformats/cid'

// Node 20 lacks Promise.withResolvers, which newer transitive dependencies (it-queue) call.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const [nodeAddr, serverAddr, cidText] = process.argv.slice(2)

const peer = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    // js-libp2p identifies every new connection by itself, and this script then asks once more,
    // explicitly: allow both at once (the default of one made the explicit call fail whenever the
    // automatic one was still running, a race seen under load).
    identify: identify({ maxOutboundStreams: 2 }),
    ping: ping({ maxOutboundStreams: 4 }),
    dht: kadDHT({ protocol: '/ipfs/kad/1.0.0', clientMode: true, peerInfoMapper: passthroughMapper })
  }
})

const out = {}
try {
  const nodeMa = multiaddr(nodeAddr)
  const conn = await peer.dial(nodeMa, { signal: AbortSignal.timeout(10000) })
  out.node_peer = conn.remotePeer.toString()
  out.encryption = conn.encryption
  out.multiplexer = conn.multiplexer
  const id = await peer.services.identify.identify(conn, { signal: AbortSignal.timeout(10000) })
  out.identify = { protocols: id.protocols, agent: id.agentVersion, listen: id.listenAddrs.map(String) }
  out.ping_ms = await peer.services.ping.ping(nodeMa, { signal: AbortSignal.timeout(10000) })

  await peer.dial(multiaddr(serverAddr), { signal: AbortSignal.timeout(10000) })
  const cid = CID.parse(cidText)
  const providers = new Set()
  const deadline = Date.now() + 15000
  while (providers.size === 0 && Date.now() < deadline) {
    try {
      for await (const p of peer.contentRouting.findProviders(cid, { signal: AbortSignal.timeout(5000) })) {
        providers.add(p.id.toString())
      }
    } catch (err) {
      out.last_error = String(err)
    }
    if (providers.size === 0) await new Promise(resolve => setTimeout(resolve, 250))
  }
  out.providers = [...providers]
} catch (err) {
  out.error = String(err && err.stack || err)
} finally {
  await peer.stop()
}
process.stdout.write(JSON.stringify(out) + '\n')
