//! A node's pressure reports: carried to its peers over their links, kept
//! after it leaves a view (what a lost node said before it went), and of
//! no weight on anything else (see `dlm_core::cluster`'s `pressure`).

use std::time::Duration;

use dlm_core::Mode;
use dlm_core::cluster::{NodeId, NodePressure, PeerMessage};

use crate::net::Net;

#[test]
fn a_lost_nodes_last_pressure_report_outlives_it_at_every_survivor() {
    let mut net = Net::new();
    let name = net.name_with_directory(1);
    net.lock(2, 1, &name, Mode::Ex);
    net.deliver_all();
    net.completion(2, 1);
    let squeezed = NodePressure { memory_some: 640, memory_full: 380, cpu_some: 90 };
    let now = net.now;
    net.node(2).report_pressure(now, squeezed);
    net.collect();
    let reports =
        net.wire.iter().filter(|(from, _, e)| from.0 == 2 && e.message == Some(PeerMessage::Pressure(squeezed)));
    assert_eq!(reports.count(), 4, "one report to each of the 4 peers");
    net.deliver_all();
    net.advance(Duration::from_millis(1500));
    net.crash(2);
    net.recover();
    for survivor in [1, 3, 4, 5] {
        assert_eq!(net.node(survivor).peer_pressure(NodeId(2)), Some((squeezed, now)), "node {survivor}");
        assert_eq!(net.node(survivor).peer_pressure(NodeId(3)), None, "node 3 said nothing");
    }
    // The report weighed on nothing: node 2's EX went with it, as any lost node's.
    net.lock(1, 1, &name, Mode::Ex);
    net.deliver_all();
    assert!(net.completion(1, 1).token.is_some(), "granted once node 2 is gone");
}
