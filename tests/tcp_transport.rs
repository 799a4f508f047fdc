//! The TCP transport on loopback: messages flow both ways between two and three nodes, peers that
//! start late or restart are reached again (and dialed back at once when they dial in), bad
//! frames close only their own connection, both compression settings work, and `host:port`
//! peers are identified by the handshake, and removed members are not redialed.
//!
//! Every wait polls with a deadline; nothing sleeps a fixed time to let something happen (one
//! test waits a fixed time to show that something does not).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use consensus::protocol::raft::Message;
use consensus::transport::Transport;
use consensus::transport::tcp::{
    Inbound, NetworkConfig, PeerAddress, TcpTransport, TcpTransportConfig, TransportError,
};
use consensus::{Entry, NodeId, Payload, ProposalTag};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TestMessage {
    from: u64,
    seq: u64,
    body: String,
}

type Node = (TcpTransport<TestMessage>, Receiver<Inbound<TestMessage>>);

const DEADLINE: Duration = Duration::from_secs(10);
const MAX_FRAME: usize = 64 * 1024;

fn init_logs() {
    // RUST_LOG=consensus=debug shows the transport's logs when a test misbehaves.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn config(id: u64, bind: SocketAddr) -> TcpTransportConfig {
    let mut config = TcpTransportConfig::new(NodeId(id), "test-cluster", bind);
    config.max_frame_bytes = MAX_FRAME;
    config.reconnect_backoff_min = Duration::from_millis(5);
    config.reconnect_backoff_max = Duration::from_millis(100);
    config.handshake_timeout = Duration::from_secs(2);
    config
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A port nothing listens on (bound and closed at once), for a peer that starts later.
fn free_port() -> u16 {
    std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(config: TcpTransportConfig, peers: Vec<PeerAddress>) -> Node {
    TcpTransport::start(config, peers)
        .await
        .expect("transport starts")
}

/// Starts a transport on the port a stopped one held, as a restarted process would: retries
/// while the port is still being released, failing at the deadline.
async fn restart(config: TcpTransportConfig, peers: Vec<PeerAddress>) -> Node {
    let end = Instant::now() + DEADLINE;
    loop {
        match TcpTransport::start(config.clone(), peers.clone()).await {
            Ok(node) => return node,
            Err(TransportError::Bind { .. }) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("restart failed: {e}"),
        }
    }
}

fn address_of(node: &Node, with_id: bool) -> PeerAddress {
    let port = node.0.local_addr().port();
    if with_id {
        PeerAddress::with_id(node.0.node_id(), "127.0.0.1", port)
    } else {
        PeerAddress::without_id("127.0.0.1", port)
    }
}

fn message(from: u64, seq: u64) -> TestMessage {
    TestMessage {
        from,
        seq,
        body: format!("message {seq} from {from}"),
    }
}

/// Receives until `wanted` matches, failing at the deadline.
async fn receive_matching(
    rx: &mut Receiver<Inbound<TestMessage>>,
    wanted: impl Fn(NodeId, &TestMessage) -> bool,
) -> TestMessage {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match timeout(left, rx.recv()).await {
            Ok(Some(Inbound { from, message, .. })) if wanted(from, &message) => return message,
            Ok(Some(_)) => {}
            Ok(None) => panic!("inbound channel closed"),
            Err(_) => panic!("no matching message within {DEADLINE:?}"),
        }
    }
}

/// Sends a fresh message every 20 ms until the receiver gets one: for links that are being
/// (re)established, where the first messages may go into a connection that is about to break.
async fn send_until_received(
    sender: &TcpTransport<TestMessage>,
    to: NodeId,
    rx: &mut Receiver<Inbound<TestMessage>>,
) {
    let from = sender.node_id();
    let end = Instant::now() + DEADLINE;
    for seq in 0.. {
        assert!(
            Instant::now() < end,
            "{from} could not reach {to} within {DEADLINE:?}"
        );
        sender.send(to, message(from.0, seq));
        if let Ok(Some(Inbound { from: got_from, .. })) =
            timeout(Duration::from_millis(20), rx.recv()).await
        {
            assert_eq!(got_from, from);
            return;
        }
    }
}

/// Polls `condition` every 5 ms until it holds, failing at the deadline.
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `count` messages and checks they all arrive, in order, tagged with the sender's id.
async fn stream_in_order(
    sender: &TcpTransport<TestMessage>,
    to: NodeId,
    rx: &mut Receiver<Inbound<TestMessage>>,
    count: u64,
) {
    let from = sender.node_id();
    for seq in 0..count {
        sender.send(to, message(from.0, seq));
    }
    for seq in 0..count {
        let got = receive_matching(rx, |_, _| true).await;
        assert_eq!(got, message(from.0, seq), "message {seq} from {from}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transports_exchange_messages_both_ways() {
    init_logs();
    let mut a = start(config(1, loopback()), vec![]).await;
    let mut b = start(config(2, loopback()), vec![address_of(&a, true)]).await;
    a.0.add_peer(address_of(&b, true));
    stream_in_order(&a.0, NodeId(2), &mut b.1, 500).await;
    stream_in_order(&b.0, NodeId(1), &mut a.1, 500).await;
    wait_until("all acknowledged", || a.0.stats().messages_delivered == 500).await;
    assert_eq!(b.0.stats().messages_received, 500);
}

/// A transport started with `start_delivering` hands every message to its function, in order and
/// tagged with the sender, as the channel of `start` would; when the function says nothing takes
/// messages any more, the rest of that batch is dropped and the transport goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_started_delivering_hands_each_message_to_its_function() {
    init_logs();
    let mut a = start(config(1, loopback()), vec![]).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let taking = open.clone();
    let deliver: consensus::transport::tcp::Deliver<TestMessage> =
        std::sync::Arc::new(move |inbound| {
            taking.load(std::sync::atomic::Ordering::SeqCst) && tx.try_send(inbound).is_ok()
        });
    let b = TcpTransport::start_delivering(
        config(2, loopback()),
        vec![PeerAddress::with_id(
            NodeId(1),
            "127.0.0.1",
            a.0.local_addr().port(),
        )],
        deliver,
    )
    .await
    .expect("transport starts");
    a.0.add_peer(PeerAddress::with_id(
        NodeId(2),
        "127.0.0.1",
        b.local_addr().port(),
    ));
    stream_in_order(&a.0, NodeId(2), &mut rx, 500).await;
    stream_in_order(&b, NodeId(1), &mut a.1, 10).await;
    wait_until("all acknowledged", || a.0.stats().messages_delivered == 500).await;
    assert_eq!(b.stats().messages_received, 500);
    // Nothing takes messages any more: none arrive, and the sender is still answered.
    open.store(false, std::sync::atomic::Ordering::SeqCst);
    for seq in 500..510 {
        a.0.send(NodeId(2), message(1, seq));
    }
    wait_until("the batches acknowledged", || {
        a.0.stats().batches_delivered > 0 && a.0.stats().messages_delivered == 510
    })
    .await;
    assert!(
        rx.try_recv().is_err(),
        "a message arrived after the function refused"
    );
}

/// On a single-threaded runtime the peer's task cannot run while the test sends, so what it finds
/// queued is exactly what was sent: one batch when it fits a frame, several cut at the frame
/// limit when it does not, and a message larger than a frame is dropped on its own.
#[tokio::test(flavor = "current_thread")]
async fn queued_messages_go_as_one_batch_or_are_cut_at_the_frame_limit() {
    init_logs();
    let a = start(config(1, loopback()), vec![]).await;
    let mut b = start(config(2, loopback()), vec![]).await;
    a.0.add_peer(address_of(&b, true));
    send_until_received(&a.0, NodeId(2), &mut b.1).await;
    let delivered = |a: &Node| a.0.stats().messages_delivered;
    wait_until("the first message is acknowledged", || delivered(&a) >= 1).await;
    let before = a.0.stats();

    // 1000 small messages: about 40 KB, one frame.
    stream_in_order(&a.0, NodeId(2), &mut b.1, 1000).await;
    wait_until("all acknowledged", || {
        delivered(&a) == before.messages_delivered + 1000
    })
    .await;
    let after_small = a.0.stats();
    assert_eq!(
        after_small.batches_delivered,
        before.batches_delivered + 1,
        "{after_small:?}"
    );

    // 600 messages of 1 KB: about 600 KB, cut into frames of at most 64 KiB.
    let body = "b".repeat(1000);
    for seq in 0..600 {
        a.0.send(
            NodeId(2),
            TestMessage {
                from: 1,
                seq,
                body: body.clone(),
            },
        );
    }
    // Larger than a frame: dropped and counted, and what follows still goes.
    a.0.send(
        NodeId(2),
        TestMessage {
            from: 1,
            seq: 600,
            body: "x".repeat(MAX_FRAME),
        },
    );
    a.0.send(NodeId(2), message(1, 601));
    for seq in (0..600).chain([601]) {
        let got = receive_matching(&mut b.1, |_, _| true).await;
        assert_eq!(got.seq, seq);
    }
    wait_until("all acknowledged", || {
        delivered(&a) == after_small.messages_delivered + 601
    })
    .await;
    let after_large = a.0.stats();
    let batches = after_large.batches_delivered - after_small.batches_delivered;
    assert!(
        (10..=13).contains(&batches),
        "600 KB in {batches} batches: {after_large:?}"
    );
    assert_eq!(after_large.dropped_undelivered, 1, "{after_large:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_transports_all_reach_each_other() {
    init_logs();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(config(id, loopback()), vec![]).await);
    }
    let addresses: Vec<PeerAddress> = nodes.iter().map(|n| address_of(n, true)).collect();
    for (i, node) in nodes.iter().enumerate() {
        for (j, address) in addresses.iter().enumerate() {
            if i != j {
                node.0.add_peer(address.clone());
            }
        }
    }
    for sender in 0..3 {
        for receiver in 0..3 {
            if sender == receiver {
                continue;
            }
            let to = nodes[receiver].0.node_id();
            for seq in 0..50 {
                nodes[sender].0.send(to, message(sender as u64 + 1, seq));
            }
        }
    }
    for (receiver, node) in nodes.iter_mut().enumerate() {
        let mut next_seq = [0u64; 4];
        for _ in 0..100 {
            let Inbound {
                from, message: got, ..
            } = timeout(DEADLINE, node.1.recv()).await.unwrap().unwrap();
            assert_eq!(from.0, got.from, "the sender id is the handshake's");
            assert_ne!(from.0, receiver as u64 + 1);
            assert_eq!(got.seq, next_seq[from.0 as usize], "in order from {from}");
            next_seq[from.0 as usize] += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_starts_late_is_reached_after_reconnecting() {
    init_logs();
    // Leave the port closed until the late peer binds it.
    let port = free_port();
    let late_address = PeerAddress::with_id(NodeId(2), "127.0.0.1", port);
    let a = start(config(1, loopback()), vec![late_address]).await;
    a.0.send(NodeId(2), message(1, 0));
    wait_until("the dialer has failed twice", || {
        a.0.stats().dial_failures >= 2
    })
    .await;
    let mut b = start(
        config(2, format!("127.0.0.1:{port}").parse().unwrap()),
        vec![],
    )
    .await;
    // The message queued while the peer was down arrives once it is up.
    let got = receive_matching(&mut b.1, |_, _| true).await;
    assert_eq!(got, message(1, 0));
}

/// A dialer waiting out its backoff to reach a peer dials at once when that peer dials in: a
/// restarted node hears from the others as soon as it is up, not a backoff later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dials_in_is_dialed_back_without_waiting_out_the_backoff() {
    init_logs();
    let port = free_port();
    let late_address = PeerAddress::with_id(NodeId(2), "127.0.0.1", port);
    let mut patient = config(1, loopback());
    // Far longer than the deadline: only the wake-up can deliver in time.
    patient.reconnect_backoff_min = Duration::from_secs(600);
    patient.reconnect_backoff_max = Duration::from_secs(600);
    let a = start(patient, vec![late_address]).await;
    a.0.send(NodeId(2), message(1, 0));
    wait_until("the dialer has failed once", || {
        a.0.stats().dial_failures >= 1
    })
    .await;
    let mut b = start(
        config(2, format!("127.0.0.1:{port}").parse().unwrap()),
        vec![address_of(&a, true)],
    )
    .await;
    b.0.send(NodeId(1), message(2, 0));
    let got = receive_matching(&mut b.1, |_, _| true).await;
    assert_eq!(got, message(1, 0));
    assert_eq!(a.0.stats().dial_failures, 1, "{:?}", a.0.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reached_again() {
    init_logs();
    let mut a = start(config(1, loopback()), vec![]).await;
    let mut b = start(config(2, loopback()), vec![address_of(&a, true)]).await;
    let b_address = b.0.local_addr();
    a.0.add_peer(address_of(&b, true));
    send_until_received(&a.0, NodeId(2), &mut b.1).await;
    send_until_received(&b.0, NodeId(1), &mut a.1).await;

    // Drop (not shutdown) and start again on the same port, as a restarted process would.
    drop(b);
    let mut b = restart(config(2, b_address), vec![address_of(&a, true)]).await;
    send_until_received(&a.0, NodeId(2), &mut b.1).await;
    send_until_received(&b.0, NodeId(1), &mut a.1).await;
    assert!(
        a.0.stats().connections_established >= 2,
        "{:?}",
        a.0.stats()
    );
}

/// A peer whose process goes away (its sockets closed, its port refusing) is reported on
/// `unreachable_peers`; a live one exchanging messages is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_goes_away_is_reported_unreachable() {
    init_logs();
    let mut a = start(config(1, loopback()), vec![]).await;
    let mut unreachable = a.0.unreachable_peers();
    let mut b = start(config(2, loopback()), vec![address_of(&a, true)]).await;
    a.0.add_peer(address_of(&b, true));
    send_until_received(&a.0, NodeId(2), &mut b.1).await;
    send_until_received(&b.0, NodeId(1), &mut a.1).await;
    stream_in_order(&a.0, NodeId(2), &mut b.1, 200).await;
    assert!(
        unreachable.try_recv().is_err(),
        "a live peer was reported unreachable"
    );

    b.0.shutdown().await;
    let reported = timeout(DEADLINE, unreachable.recv()).await;
    assert_eq!(reported.ok().flatten(), Some(NodeId(2)));
    assert!(a.0.stats().unreachable_reports >= 1, "{:?}", a.0.stats());
}

/// Writes `bytes` on a raw connection to `address` and waits until the server closes it.
fn raw_connection_is_closed_after(address: SocketAddr, bytes: &[u8]) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The server may close before reading everything; a reset on write is a close too.
    let _ = stream.write_all(bytes);
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_close_only_their_connection() {
    init_logs();
    let mut a = start(config(1, loopback()), vec![]).await;
    // A handshake deadline far beyond the wait below: only the frame checks can close the raw
    // connections in time.
    let mut patient = config(2, loopback());
    patient.handshake_timeout = Duration::from_secs(60);
    let mut b = start(patient, vec![]).await;
    a.0.add_peer(address_of(&b, true));
    send_until_received(&a.0, NodeId(2), &mut b.1).await;
    let target = b.0.local_addr();

    // A length prefix one byte over the limit: refused from the prefix alone.
    let mut oversized = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0xAB; 64]);
    // A frame within the limit whose bytes are no tarpc message.
    let mut garbage = 32u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xFF; 32]);
    // Random bytes whose first four make an absurd length.
    let noise: Vec<u8> = (0..256u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (n, bytes) in [oversized, garbage, noise].iter().enumerate() {
        let closed = tokio::task::spawn_blocking({
            let bytes = bytes.clone();
            move || raw_connection_is_closed_after(target, &bytes)
        });
        timeout(DEADLINE, closed).await.unwrap().unwrap();
        wait_until("the server counted the rejection", || {
            b.0.stats().connections_rejected > n as u64
        })
        .await;
        // The good peer's connection is untouched and the node goes on.
        let seq = 1000 + n as u64;
        a.0.send(NodeId(2), message(1, seq));
        let got = receive_matching(&mut b.1, |_, m| m.seq >= 1000).await;
        assert_eq!(got.seq, seq);
    }
    assert_eq!(
        a.0.stats().connections_established,
        1,
        "the good connection never broke"
    );
    // And the server still answers the other way.
    b.0.add_peer(address_of(&a, true));
    send_until_received(&b.0, NodeId(1), &mut a.1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_on_and_off_both_deliver_intact_messages() {
    init_logs();
    for (compress_a, compress_b) in [(false, false), (true, true), (true, false)] {
        let with = |id, compress| {
            let mut c = config(id, loopback());
            c.network = NetworkConfig {
                message_compression: compress,
                tcp_nodelay: true,
                send_buffer_size: 256 * 1024,
                recv_buffer_size: 256 * 1024,
            };
            c
        };
        let mut a = start(with(1, compress_a), vec![]).await;
        let mut b = start(with(2, compress_b), vec![address_of(&a, true)]).await;
        a.0.add_peer(address_of(&b, true));
        // Large compressible messages, small ones, and incompressible ones.
        let bodies: Vec<String> = vec![
            "consensus ".repeat(2000),
            "x".into(),
            (0..3000u32)
                .map(|i| char::from(b'!' + (i.wrapping_mul(2_654_435_761) >> 26) as u8))
                .collect(),
        ];
        for (sender, receiver, to) in [(&a.0, &mut b.1, NodeId(2)), (&b.0, &mut a.1, NodeId(1))] {
            for (seq, body) in bodies.iter().enumerate() {
                let sent = TestMessage {
                    from: sender.node_id().0,
                    seq: seq as u64,
                    body: body.clone(),
                };
                sender.send(to, sent.clone());
                let got = receive_matching(receiver, |_, _| true).await;
                assert_eq!(got, sent, "compression {compress_a}/{compress_b}");
            }
        }
        a.0.shutdown().await;
        b.0.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_peers_learn_their_ids_in_the_handshake() {
    init_logs();
    let mut a = start(config(11, loopback()), vec![]).await;
    let mut b = start(config(22, loopback()), vec![address_of(&a, false)]).await;
    a.0.add_peer(address_of(&b, false));
    // Before the handshake the id is unknown, and messages to it are counted as dropped.
    wait_until("both learned the other's id", || {
        a.0.known_peers() == vec![NodeId(22)] && b.0.known_peers() == vec![NodeId(11)]
    })
    .await;
    stream_in_order(&a.0, NodeId(22), &mut b.1, 20).await;
    stream_in_order(&b.0, NodeId(11), &mut a.1, 20).await;
    a.0.send(NodeId(99), message(11, 0));
    assert_eq!(a.0.stats().dropped_unknown_peer, 1);
}

/// A member removed from the group is not redialed, though it was configured as a bare
/// `host:port` and known by id only from its handshake: when it comes back on its port, a
/// transport that still has it as a peer reconnects, the one that removed it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_host_port_peer_is_not_redialed() {
    init_logs();
    let mut b = start(config(42, loopback()), vec![]).await;
    let b_address = b.0.local_addr();
    let removing = start(config(41, loopback()), vec![address_of(&b, false)]).await;
    let keeping = start(config(43, loopback()), vec![address_of(&b, false)]).await;
    wait_until("both learned b's id", || {
        removing.0.known_peers() == vec![NodeId(42)] && keeping.0.known_peers() == vec![NodeId(42)]
    })
    .await;
    stream_in_order(&removing.0, NodeId(42), &mut b.1, 5).await;

    removing.0.remove_member(NodeId(42));
    assert!(removing.0.known_peers().is_empty());
    let dialed_by_removing = removing.0.stats().connections_established;
    let dialed_by_keeping = keeping.0.stats().connections_established;
    b.0.shutdown().await;
    let b = restart(config(42, b_address), vec![]).await;
    wait_until("the transport that kept b dialed it again", || {
        keeping.0.stats().connections_established > dialed_by_keeping
    })
    .await;
    // Several of the removing transport's backoff periods (at most 100 ms each here): a dialer
    // still running would have reconnected by now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        removing.0.stats().connections_established,
        dialed_by_removing,
        "the removed peer was dialed again"
    );
    assert!(removing.0.known_peers().is_empty());
    drop(b);
}

/// A member removed while a bare `host:port` dialer had not reached it yet (so did not know its
/// id) is not dialed once it comes up: the dialer that learns the removed id in its first
/// handshake stops instead of routing to it. Adding the member back dials it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_peer_removed_before_its_first_handshake_is_not_dialed() {
    init_logs();
    let port = free_port();
    let bare = PeerAddress::without_id("127.0.0.1", port);
    let removing = start(config(41, loopback()), vec![bare.clone()]).await;
    let keeping = start(config(43, loopback()), vec![bare]).await;
    removing.0.remove_member(NodeId(42));
    let mut b = restart(config(42, SocketAddr::from(([127, 0, 0, 1], port))), vec![]).await;
    wait_until("the transport that kept b reached it", || {
        keeping.0.known_peers() == vec![NodeId(42)]
    })
    .await;
    wait_until("the removing transport shook hands with b once", || {
        removing.0.stats().connections_established == 1
    })
    .await;
    // Several backoff periods (at most 100 ms each here): a dialer still running would have
    // filed b's id and reconnected by now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        removing.0.known_peers().is_empty(),
        "the removed peer was routed to"
    );
    assert_eq!(removing.0.stats().connections_established, 1);

    removing
        .0
        .add_member(NodeId(42), &format!("127.0.0.1:{port}"));
    wait_until("b, added back, is dialed", || {
        removing.0.known_peers() == vec![NodeId(42)]
    })
    .await;
    stream_in_order(&removing.0, NodeId(42), &mut b.1, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_cluster_or_with_another_id_is_refused() {
    init_logs();
    let b = start(config(2, loopback()), vec![]).await;
    let mut other = config(1, loopback());
    other.cluster_id = "another-cluster".into();
    let a = start(other, vec![address_of(&b, false)]).await;
    // Configured with the wrong id for b.
    let c = start(
        config(3, loopback()),
        vec![PeerAddress::with_id(
            NodeId(7),
            "127.0.0.1",
            b.0.local_addr().port(),
        )],
    )
    .await;
    wait_until("both dialers failed", || {
        a.0.stats().dial_failures >= 2 && c.0.stats().dial_failures >= 2
    })
    .await;
    assert!(a.0.known_peers().is_empty());
    assert_eq!(
        c.0.known_peers(),
        vec![NodeId(7)],
        "the configured id stays; it is never reached"
    );
    assert_eq!(
        a.0.stats().connections_established + c.0.stats().connections_established,
        0
    );
    assert!(b.0.stats().connections_rejected >= 2, "{:?}", b.0.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_peer_queue_drops_and_counts_instead_of_blocking() {
    init_logs();
    let port = free_port();
    let mut small = config(1, loopback());
    small.peer_queue_capacity = 8;
    let a = start(
        small,
        vec![PeerAddress::with_id(NodeId(2), "127.0.0.1", port)],
    )
    .await;
    for seq in 0..20 {
        a.0.send(NodeId(2), message(1, seq));
    }
    let stats = a.0.stats();
    assert_eq!(
        (stats.messages_queued, stats.dropped_queue_full),
        (8, 12),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_cross_the_wire_intact() {
    init_logs();
    let (a, _a_rx) = TcpTransport::<Message>::start(config(1, loopback()), vec![])
        .await
        .unwrap();
    let (b, mut b_rx) = TcpTransport::<Message>::start(config(2, loopback()), vec![])
        .await
        .unwrap();
    a.add_peer(PeerAddress::with_id(
        NodeId(2),
        "127.0.0.1",
        b.local_addr().port(),
    ));
    let entries = vec![
        Entry {
            term: 3,
            index: 10,
            payload: Payload::Blank,
        },
        Entry {
            term: 3,
            index: 11,
            payload: Payload::Command {
                tag: ProposalTag {
                    proposer: NodeId(1),
                    request_id: 99,
                },
                data: Bytes::from_static(b"\x00key\xffvalue"),
            },
        },
    ];
    let sent = vec![
        Message::AppendEntries {
            term: 3,
            prev_log_index: 9,
            prev_log_term: 2,
            entries,
            leader_commit: 9,
        },
        Message::Heartbeat {
            term: 3,
            commit: 11,
            round: 4,
        },
        Message::ReadIndex {
            term: 3,
            read_ids: vec![1, 2],
        },
        Message::ReadIndexResponse {
            term: 3,
            read_ids: vec![2],
            index: 11,
            index_term: 3,
        },
        Message::ForwardProposals {
            term: 3,
            proposals: vec![(7, Bytes::from_static(b"p"))],
        },
    ];
    // The first messages may be queued before the connection is up; they are sent once it is.
    for message in &sent {
        a.send(NodeId(2), message.clone());
    }
    for expected in &sent {
        let Inbound {
            from, message: got, ..
        } = timeout(DEADLINE, b_rx.recv()).await.unwrap().unwrap();
        assert_eq!((from, &got), (NodeId(1), expected));
    }
}

#[test]
fn starting_outside_a_tokio_runtime_is_an_error() {
    let start = TcpTransport::<TestMessage>::start(config(1, loopback()), vec![]);
    let err = futures::executor::block_on(start).unwrap_err();
    assert!(matches!(err, TransportError::NoRuntime), "{err}");
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_at_start() {
    let mut bad = config(1, loopback());
    bad.max_frame_bytes = 10;
    let err = TcpTransport::<TestMessage>::start(bad, vec![])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_frame_bytes"), "{err}");
}
