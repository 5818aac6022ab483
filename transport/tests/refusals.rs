//! Peers that must not exchange changes are refused, with the right error, on both sides.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use accord_engine::{Hello, NodeId, Refusal};
use accord_transport::certs::{Ca, DEFAULT_DAYS};
use accord_transport::{Endpoint, EndpointConfig, PeerEvent, Rejection, TlsIdentity};
use support::*;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

fn not_dialled() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

fn start(config: EndpointConfig) -> (Endpoint, mpsc::Receiver<PeerEvent>) {
    let id = config.identity.clone();
    Endpoint::start(config, move |_| hello(&id, 0)).unwrap()
}

fn start_with(
    config: EndpointConfig,
    hello_for: impl Fn(NodeId) -> Hello + Send + Sync + 'static,
) -> (Endpoint, mpsc::Receiver<PeerEvent>) {
    Endpoint::start(config, hello_for).unwrap()
}

fn is_up(peer: NodeId) -> impl FnMut(&PeerEvent) -> bool {
    move |e| matches!(e, PeerEvent::Up { link, .. } if link.peer() == peer)
}

fn rejected(event: PeerEvent) -> (Option<NodeId>, Rejection) {
    match event {
        PeerEvent::Rejected { peer, rejection, .. } => (peer, rejection),
        other => panic!("not a rejection: {other:?}"),
    }
}

fn is_rejected(e: &PeerEvent) -> bool {
    matches!(e, PeerEvent::Rejected { .. })
}

/// A node whose certificate comes from another CA. It trusts `trusted`, so (as a dialler) its
/// `connect` completes and only the acceptor's check stops it.
fn foreign_tls(trusted: &Ca, node: NodeId) -> TlsIdentity {
    let other = Ca::generate(1).unwrap();
    let cert = other.issue(node, DEFAULT_DAYS).unwrap();
    TlsIdentity::from_pem(&trusted.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_by_dialler_and_acceptor() {
    init_tracing();
    let ca = Ca::generate(1).unwrap();
    // 2 and 3 are good; 1 (dials 2) and 4 (dialled by 3) hold certificates of other CAs.
    let mut config4 = config(&ca, NodeId(4), loopback(), &[(NodeId(3), not_dialled())]);
    let other = Ca::generate(1).unwrap();
    config4.tls = tls(&other, NodeId(4));
    let (n4, mut ev4) = start(config4);
    let (n3, mut ev3) = start(config(
        &ca,
        NodeId(3),
        loopback(),
        &[(NodeId(2), not_dialled()), (NodeId(4), n4.local_addr())],
    ));
    let (n2, mut ev2) = start(config(
        &ca,
        NodeId(2),
        loopback(),
        &[(NodeId(1), not_dialled()), (NodeId(3), n3.local_addr())],
    ));
    let mut config1 = config(&ca, NodeId(1), loopback(), &[(NodeId(2), n2.local_addr())]);
    config1.tls = foreign_tls(&ca, NodeId(1));
    let (_n1, mut ev1) = start(config1);

    // The acceptor's TLS refuses the dialler's certificate; the dialler hears of it.
    let (peer, rejection) = rejected(expect_event(&mut ev2, WAIT, "2 rejects 1", is_rejected).await);
    assert_eq!(peer, None, "an unverified certificate names nobody");
    assert!(
        matches!(&rejection, Rejection::Tls(m) if m.contains("UnknownIssuer")),
        "{rejection}"
    );
    let (peer, rejection) = rejected(expect_event(&mut ev1, WAIT, "1 is rejected", is_rejected).await);
    assert_eq!(peer, Some(NodeId(2)));
    assert!(matches!(rejection, Rejection::TlsRejectedByPeer(_)), "{rejection}");

    // The dialler's TLS refuses the acceptor's certificate; meanwhile the good nodes have their
    // link (node 3 hears of both, in either order).
    let mut up_with_2 = false;
    let mut rejected_4 = None;
    while !up_with_2 || rejected_4.is_none() {
        let event = expect_event(&mut ev3, WAIT, "3 up with 2, and 3 rejects 4", |e| {
            is_up(NodeId(2))(e) || is_rejected(e)
        })
        .await;
        if is_rejected(&event) {
            rejected_4.get_or_insert(rejected(event));
        } else {
            up_with_2 = true;
        }
    }
    let (peer, rejection) = rejected_4.expect("the loop ends only with a rejection");
    assert_eq!(peer, Some(NodeId(4)));
    assert!(
        matches!(&rejection, Rejection::Tls(m) if m.contains("UnknownIssuer")),
        "{rejection}"
    );
    let (_, rejection) = rejected(expect_event(&mut ev4, WAIT, "4 is rejected", is_rejected).await);
    assert!(matches!(rejection, Rejection::TlsRejectedByPeer(_)), "{rejection}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_another_nodes_id_is_refused() {
    init_tracing();
    let ca = Ca::generate(1).unwrap();
    let liar = |claimed: NodeId, certified: NodeId| {
        let mut id = identity(certified);
        id.node = claimed;
        move |_: NodeId| hello(&id, 0)
    };
    // Node 5 holds node 5's certificate but says it is node 1; node 2 dials it.
    let (n5, mut ev5) = start_with(
        config(&ca, NodeId(5), loopback(), &[(NodeId(2), not_dialled())]),
        liar(NodeId(1), NodeId(5)),
    );
    let (n2, mut ev2) = start(config(
        &ca,
        NodeId(2),
        loopback(),
        &[(NodeId(1), not_dialled()), (NodeId(5), n5.local_addr())],
    ));
    // Node 1 holds node 1's certificate but says it is node 3; it dials node 2.
    let (_n1, mut ev1) = start_with(
        config(&ca, NodeId(1), loopback(), &[(NodeId(2), n2.local_addr())]),
        liar(NodeId(3), NodeId(1)),
    );

    let mismatch = |claimed, certified| {
        Rejection::Refused(Refusal::IdentityMismatch {
            claimed: NodeId(claimed),
            certified: NodeId(certified),
        })
    };
    // Both liars retry, so either may be refused several times before the other is once.
    let as_dialler = (Some(NodeId(5)), mismatch(1, 5));
    let as_acceptor = (Some(NodeId(1)), mismatch(3, 1));
    let mut seen = Vec::new();
    while !(seen.contains(&as_dialler) && seen.contains(&as_acceptor)) {
        let refusal = rejected(expect_event(&mut ev2, WAIT, "2 refuses the liars", is_rejected).await);
        assert!(refusal == as_dialler || refusal == as_acceptor, "{refusal:?}");
        seen.push(refusal);
    }
    let (_, rejection) = rejected(expect_event(&mut ev1, WAIT, "1 hears", is_rejected).await);
    assert_eq!(
        rejection,
        Rejection::RefusedByPeer(Refusal::IdentityMismatch {
            claimed: NodeId(3),
            certified: NodeId(1)
        })
    );
    let (_, rejection) = rejected(expect_event(&mut ev5, WAIT, "5 hears", is_rejected).await);
    assert_eq!(
        rejection,
        Rejection::RefusedByPeer(Refusal::IdentityMismatch {
            claimed: NodeId(1),
            certified: NodeId(5)
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_cluster_is_refused() {
    init_tracing();
    let ca = Ca::generate(1).unwrap();
    let mut config2 = config(&ca, NodeId(2), loopback(), &[(NodeId(1), not_dialled())]);
    config2.identity.cluster = "other".into();
    let (n2, mut ev2) = start(config2);
    let (_n1, mut ev1) = start(config(&ca, NodeId(1), loopback(), &[(NodeId(2), n2.local_addr())]));
    // Each side refuses the other, and says so.
    let (peer, rejection) = rejected(expect_event(&mut ev1, WAIT, "1 refuses", is_rejected).await);
    assert_eq!(peer, Some(NodeId(2)));
    assert_eq!(
        rejection,
        Rejection::Refused(Refusal::OtherCluster {
            ours: CLUSTER.into(),
            theirs: "other".into()
        })
    );
    let (peer, rejection) = rejected(expect_event(&mut ev2, WAIT, "2 refuses", is_rejected).await);
    assert_eq!(peer, Some(NodeId(1)));
    assert_eq!(
        rejection,
        Rejection::Refused(Refusal::OtherCluster {
            ours: "other".into(),
            theirs: CLUSTER.into()
        })
    );
}

/// Nodes whose policies differ (one migrated, one not yet: issue 17) still connect: each change
/// names its table's shape, and the receiver reads it by column name or waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_policy_fingerprint_connects() {
    init_tracing();
    let ca = Ca::generate(1).unwrap();
    let mut config2 = config(&ca, NodeId(2), loopback(), &[(NodeId(1), not_dialled())]);
    config2.identity.fingerprint = "policy-xyz".into();
    let (n2, mut ev2) = start(config2);
    let (_n1, mut ev1) = start(config(&ca, NodeId(1), loopback(), &[(NodeId(2), n2.local_addr())]));
    expect_event(&mut ev1, WAIT, "1 up with 2", is_up(NodeId(2))).await;
    expect_event(&mut ev2, WAIT, "2 up with 1", is_up(NodeId(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_in_the_peer_list_is_refused() {
    init_tracing();
    let ca = Ca::generate(1).unwrap();
    let (n2, mut ev2) = start(config(&ca, NodeId(2), loopback(), &[(NodeId(3), not_dialled())]));
    let (_n1, mut ev1) = start(config(&ca, NodeId(1), loopback(), &[(NodeId(2), n2.local_addr())]));
    let unknown = Refusal::UnknownPeer { node: NodeId(1) };
    let (peer, rejection) = rejected(expect_event(&mut ev2, WAIT, "2 refuses", is_rejected).await);
    assert_eq!(
        (peer, rejection),
        (Some(NodeId(1)), Rejection::Refused(unknown.clone()))
    );
    let (_, rejection) = rejected(expect_event(&mut ev1, WAIT, "1 hears", is_rejected).await);
    assert_eq!(rejection, Rejection::RefusedByPeer(unknown));
}

/// Membership changes while endpoints run: a peer added later is dialled and accepted; a peer
/// removed has its link closed and is refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_added_and_removed_at_run_time() {
    init_tracing();
    let ca = Ca::generate(1).unwrap();
    // Node 2 knows nobody yet: node 1's dials are refused.
    let (mut n2, mut ev2) = start(config(&ca, NodeId(2), loopback(), &[]));
    let (mut n1, mut ev1) = start(config(&ca, NodeId(1), loopback(), &[(NodeId(2), n2.local_addr())]));
    let (peer, rejection) = rejected(expect_event(&mut ev1, WAIT, "1 is refused by 2", is_rejected).await);
    assert_eq!(peer, Some(NodeId(2)));
    assert!(
        matches!(rejection, Rejection::RefusedByPeer(Refusal::UnknownPeer { node }) if node == NodeId(1)),
        "{rejection}"
    );

    // Node 2 learns of node 1: the next dial gets through.
    n2.set_peers(&[accord_transport::PeerAddr {
        node: NodeId(1),
        addr: not_dialled(),
    }])
    .unwrap();
    expect_event(&mut ev2, WAIT, "2 up with 1", is_up(NodeId(1))).await;
    expect_event(&mut ev1, WAIT, "1 up with 2", is_up(NodeId(2))).await;

    // Node 1 drops node 2: its link goes down on both sides, and it dials no more.
    n1.set_peers(&[]).unwrap();
    let down = expect_event(&mut ev1, WAIT, "1 down with 2", |e| matches!(e, PeerEvent::Down { .. })).await;
    assert!(
        matches!(&down, PeerEvent::Down { peer, reason, .. } if *peer == NodeId(2) && reason.to_string().contains("no longer a member")),
        "{down:?}"
    );
    expect_event(&mut ev2, WAIT, "2 down with 1", |e| matches!(e, PeerEvent::Down { .. })).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(event) = ev2.try_recv() {
        assert!(
            !is_up(NodeId(1))(&event),
            "node 1 dialled again after it dropped node 2: {event:?}"
        );
    }
}
