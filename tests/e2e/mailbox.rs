//! Mailboxes and couriers: a message reaches a recipient that is never
//! online together with its sender, through holders on the internet (the
//! peers closest to the recipient's mailbox key) or a BLE courier; holders
//! survive `kill -9`, keep to their quotas, and hand mail only to its
//! recipient.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::ble::{Medium, ble_peers, offline_with, wait_ble_link};
use crate::util::{Daemon, eventually, files_containing};

const T: Duration = Duration::from_secs(120);

/// The peer id of a node that is not running: started once (alone) and
/// stopped, so that its data directory holds its identity.
fn identity_of(dir: &Path) -> String {
    let mut d = Daemon::start(dir, &[]);
    let id = d.peer_id.clone();
    d.terminate();
    id
}

fn send(d: &Daemon, to: &str, text: &str) -> String {
    d.json(&["send", to, text])["message_id"]
        .as_str()
        .expect("message_id")
        .to_owned()
}

/// The outbox entry of message `id`, if still waiting.
fn outbox_entry(d: &Daemon, id: &str) -> Option<Value> {
    d.json_or_nothing(&["outbox"])
        .as_array()?
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
}

/// Waits until message `id` was deposited with at least `n` holders;
/// returns them.
fn wait_deposited(d: &Daemon, id: &str, n: usize) -> Vec<String> {
    eventually(
        T,
        &format!("message {id} deposited with {n} holders"),
        || {
            let m = outbox_entry(d, id)?;
            let holders: Vec<String> = m["mailbox"]["holders"]
                .as_array()?
                .iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect();
            (holders.len() >= n).then_some(holders)
        },
    )
}

/// Texts `d` received from `from`.
fn received(d: &Daemon, from: &str) -> Vec<String> {
    d.json_or_nothing(&["messages", from])
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["direction"] == "in")
                .filter_map(|m| m["text"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_received(d: &Daemon, from: &str, want: &[&str]) {
    eventually(T, &format!("{} receives {want:?}", d.peer_id), || {
        (received(d, from) == want).then_some(())
    });
}

/// Waits until `d`'s message `id` is delivered; returns it.
fn wait_delivered(d: &Daemon, id: &str) -> Value {
    eventually(T, &format!("message {id} delivered"), || {
        d.json(&["messages", "--limit", "1000"])
            .as_array()?
            .iter()
            .find(|m| m["id"] == id && m["state"] == "delivered")
            .cloned()
    })
}

/// Envelopes `d` holds for others (`status.mailbox.envelopes`).
fn held(d: &Daemon) -> u64 {
    d.json(&["status"])["mailbox"]["envelopes"]
        .as_u64()
        .expect("status.mailbox.envelopes")
}

/// Three holders in one network, the first one's TCP address to bootstrap.
fn holders(root: &Path) -> Vec<Daemon> {
    let h0 = Daemon::start(&root.join("h0"), &[]);
    let mut hs = vec![];
    for i in 1..3 {
        let h = Daemon::start(
            &root.join(format!("h{i}")),
            &["--bootstrap", &h0.tcp_addr()],
        );
        h.wait_connected(&h0.peer_id, T);
        hs.push(h);
    }
    hs.insert(0, h0);
    hs
}

#[test]
fn a_message_waits_at_holders_until_its_recipient_comes_and_the_receipt_returns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let b_id = identity_of(&root.join("b"));
    let hs = holders(root);
    let mut a = Daemon::start(
        &root.join("a"),
        &[
            "--bootstrap",
            &hs[0].tcp_addr(),
            "--mailbox-after-secs",
            "2",
        ],
    );
    a.wait_connected(&hs[0].peer_id, T);
    eventually(T, "a knows the three holders", || {
        (a.json(&["status"])["routing_table_peers"].as_u64()? >= 3).then_some(())
    });

    let secret = "a letter that waits for bob";
    let id = send(&a, &b_id, secret);
    let deposited = wait_deposited(&a, &id, 3);
    for h in &hs {
        assert!(deposited.contains(&h.peer_id), "{deposited:?}");
    }
    eventually(T, "each holder holds the envelope", || {
        hs.iter().all(|h| held(h) == 1).then_some(())
    });
    // A stops; nothing readable is at the holders.
    a.terminate();
    for h in &hs {
        let hits = files_containing(&h.data_dir, secret.as_bytes());
        assert!(hits.is_empty(), "{secret:?} found in {hits:?}");
    }

    // B comes later, knowing only one holder, and gets the letter.
    let mut b = Daemon::start(&root.join("b"), &["--bootstrap", &hs[1].tcp_addr()]);
    assert_eq!(b.peer_id, b_id);
    wait_received(&b, &a.peer_id, &[secret]);
    b.terminate();

    // A returns while B is gone: the receipt waited in A's mailbox.
    let a = Daemon::start(&root.join("a"), &["--bootstrap", &hs[2].tcp_addr()]);
    let m = wait_delivered(&a, &id);
    assert_eq!(m["route"], "mailbox");
    // Every copy is gone from the holders: the letter's (deleted by B),
    // the receipt's (deleted by A).
    eventually(T, "the holders hold nothing", || {
        hs.iter().all(|h| held(h) == 0).then_some(())
    });
}

#[test]
fn a_holder_killed_with_kill_9_still_delivers_after_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let b_id = identity_of(&root.join("b"));
    let mut h = Daemon::start(&root.join("h"), &[]);
    let mut a = Daemon::start(&root.join("a"), &["--bootstrap", &h.tcp_addr()]);
    a.wait_connected(&h.peer_id, T);
    // A stops right after sending (long before the default 30 s): it
    // deposits the waiting message on its way out.
    send(&a, &b_id, "kept through a crash");
    a.terminate();
    assert_eq!(held(&h), 1);

    h.kill9();
    let h = Daemon::start(&root.join("h"), &[]);
    assert_eq!(held(&h), 1);
    let b = Daemon::start(&root.join("b"), &["--bootstrap", &h.tcp_addr()]);
    wait_received(&b, &a.peer_id, &["kept through a crash"]);
    eventually(T, "the holder drops the delivered copy", || {
        (held(&h) == 0).then_some(())
    });
}

#[test]
fn a_depositor_over_its_quota_is_refused_while_others_are_served() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let r_id = identity_of(&root.join("r"));
    // 3000 bytes: a depositor may have 750 held (one small envelope), a
    // recipient 1500.
    let h = Daemon::start(&root.join("h"), &["--mailbox-quota", "3000"]);
    let d1 = Daemon::start(
        &root.join("d1"),
        &[
            "--bootstrap",
            &h.tcp_addr(),
            "--mailbox-after-secs",
            "1",
            "--no-mailbox",
        ],
    );
    let d2 = Daemon::start(
        &root.join("d2"),
        &[
            "--bootstrap",
            &h.tcp_addr(),
            "--mailbox-after-secs",
            "1",
            "--no-mailbox",
        ],
    );
    d1.wait_connected(&h.peer_id, T);
    d2.wait_connected(&h.peer_id, T);
    assert_eq!(
        h.json(&["status"])["mailbox"]["quota_bytes"].as_u64(),
        Some(3000)
    );

    let first = send(&d1, &r_id, "one");
    assert_eq!(wait_deposited(&d1, &first, 1), vec![h.peer_id.clone()]);
    let second = send(&d1, &r_id, "two");
    let note = eventually(T, "the second deposit is refused", || {
        let m = outbox_entry(&d1, &second)?;
        m["mailbox"]["note"].as_str().map(str::to_owned)
    });
    assert!(note.contains("over quota"), "{note}");
    assert!(
        outbox_entry(&d1, &second).expect("waiting")["mailbox"]["holders"]
            .as_array()
            .is_none_or(|a| a.is_empty())
    );
    // Another depositor is still served.
    let other = send(&d2, &r_id, "three");
    assert!(wait_deposited(&d2, &other, 1).contains(&h.peer_id));
    assert_eq!(held(&h), 2);
    // The node that holds for nobody says so.
    assert_eq!(d1.json(&["status"])["mailbox"]["enabled"], false);
}

#[test]
fn a_node_that_is_not_the_recipient_cannot_take_its_mail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let b_id = identity_of(&root.join("b"));
    let h = Daemon::start(&root.join("h"), &[]);
    let mut a = Daemon::start(
        &root.join("a"),
        &["--bootstrap", &h.tcp_addr(), "--mailbox-after-secs", "1"],
    );
    a.wait_connected(&h.peer_id, T);
    let id = send(&a, &b_id, "for bob only");
    wait_deposited(&a, &id, 1);
    let envelope = outbox_entry(&a, &id).expect("waiting")["mailbox"]["envelope_ids"][0]
        .as_str()
        .expect("an envelope id")
        .to_owned();
    a.terminate();
    assert_eq!(held(&h), 1);

    // M connects and asks the holder for its mail (at every connection):
    // it gets nothing of B's, and B's copy stays.
    let m = Daemon::start(&root.join("m"), &["--bootstrap", &h.tcp_addr()]);
    m.wait_connected(&h.peer_id, T);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        assert_eq!(held(&h), 1);
        assert!(received(&m, &a.peer_id).is_empty());
        std::thread::sleep(Duration::from_millis(500));
    }
    // Knowing the envelope's id is not enough to delete it.
    let deleted = m.json(&["mailbox-delete", &h.peer_id, &envelope]);
    assert_eq!(deleted["deleted"], 0);
    assert_eq!(held(&h), 1);
    let b = Daemon::start(&root.join("b"), &["--bootstrap", &h.tcp_addr()]);
    wait_received(&b, &a.peer_id, &["for bob only"]);
}

#[test]
fn a_ble_courier_carries_a_message_to_a_recipient_it_meets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let medium = Medium::start(root, &[]);
    let fast = ["--mailbox-after-secs", "2"];
    let x = offline_with(&root.join("x"), &medium, "0,0", &fast);
    let y = offline_with(&root.join("y"), &medium, "10,0", &fast);
    let z = offline_with(&root.join("z"), &medium, "200,0", &fast);
    wait_ble_link(&x, &y);
    assert!(!ble_peers(&z).contains(&y.peer_id));

    // Z is out of everyone's reach: X gives the message to Y to carry.
    let id = send(&x, &z.peer_id, "carried by hand");
    assert_eq!(wait_deposited(&x, &id, 1), vec![y.peer_id.clone()]);
    assert_eq!(held(&y), 1);

    // Y walks out of X's range into Z's, and hands it over.
    medium.move_to(&crate::ble::device(&y), "190,0");
    wait_ble_link(&y, &z);
    wait_received(&z, &x.peer_id, &["carried by hand"]);
    assert!(received(&y, &x.peer_id).is_empty());
    // Z deleted Y's copy and gave Y its receipt to carry back (X is out
    // of reach).
    eventually(T, "Y carries Z's receipt", || {
        let m = &y.json(&["status"])["mailbox"];
        (m["envelopes"] == 1 && m["deleted"] == 1).then_some(())
    });

    // Y carries Z's receipt back when it walks back to X.
    medium.move_to(&crate::ble::device(&y), "10,0");
    wait_ble_link(&x, &y);
    let m = wait_delivered(&x, &id);
    assert_eq!(m["route"], "mailbox");
}

/// A new identity written into `dir` (the daemon started there uses it).
fn new_identity(dir: &Path) -> (libp2p::identity::Keypair, String) {
    use std::os::unix::fs::PermissionsExt;
    let key = libp2p::identity::Keypair::generate_ed25519();
    std::fs::create_dir_all(dir).expect("data dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let bytes = key.to_protobuf_encoding().expect("encode the identity");
    std::fs::write(dir.join("identity.key"), bytes).expect("write the identity");
    let id = key.public().to_peer_id().to_string();
    (key, id)
}

/// The Kademlia distance of `peer` to `recipient`'s mailbox key of today.
fn distance_to_mailbox(peer: &str, recipient: &str) -> libp2p::kad::KBucketDistance {
    let peer: libp2p::PeerId = peer.parse().expect("a peer id");
    let recipient: libp2p::PeerId = recipient.parse().expect("a peer id");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let key = fogmesh_protocols::mailbox::key(&recipient, fogmesh_protocols::mailbox::day(now));
    libp2p::kad::KBucketKey::from(peer).distance(&libp2p::kad::KBucketKey::new(key.to_vec()))
}

#[test]
fn a_courier_that_gains_internet_hands_the_mail_to_the_recipients_holders() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (_, z_id) = new_identity(&root.join("z"));
    let hs = holders(root);
    let medium = Medium::start(root, &[]);
    let mut x = offline_with(
        &root.join("x"),
        &medium,
        "0,0",
        &["--mailbox-after-secs", "2"],
    );
    // Y has BLE and internet, but knows nobody on the internet yet.
    let y = Daemon::start(
        &root.join("y"),
        &["--ble", &medium.arg(), "--ble-position", "10,0"],
    );
    wait_ble_link(&x, &y);

    // Offline X gives the message for Z to Y over BLE, and stops.
    let secret = "carried into the internet";
    let id = send(&x, &z_id, secret);
    assert_eq!(wait_deposited(&x, &id, 1), vec![y.peer_id.clone()]);
    x.terminate();
    assert_eq!(held(&y), 1);
    assert!(hs.iter().all(|h| held(h) == 0));

    // Y reaches the internet: it deposits the sealed envelope with the
    // peers closest to Z's key, which are the three holders.
    y.json(&["connect", &hs[0].tcp_addr()]);
    eventually(T, "Z's internet holders hold the envelope", || {
        hs.iter().all(|h| held(h) == 1).then_some(())
    });
    for h in &hs {
        let hits = files_containing(&h.data_dir, secret.as_bytes());
        assert!(hits.is_empty(), "{secret:?} found in {hits:?}");
    }

    // Z, only ever on the internet, comes later and gets it, once.
    let z = Daemon::start(&root.join("z"), &["--bootstrap", &hs[1].tcp_addr()]);
    assert_eq!(z.peer_id, z_id);
    wait_received(&z, &x.peer_id, &[secret]);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        assert_eq!(received(&z, &x.peer_id), vec![secret.to_owned()]);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn copies_follow_the_peers_closest_to_the_key_when_holders_leave() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (_, b_id) = new_identity(&root.join("b"));
    let recheck = ["--mailbox-recheck-secs", "5"];
    let h0 = Daemon::start(&root.join("h0"), &recheck);
    let mut hs = vec![h0];
    for i in 1..3 {
        let mut args = vec!["--bootstrap".to_owned(), hs[0].tcp_addr()];
        args.extend(recheck.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let h = Daemon::start(&root.join(format!("h{i}")), &args);
        h.wait_connected(&hs[0].peer_id, T);
        hs.push(h);
    }
    let mut a = Daemon::start(
        &root.join("a"),
        &[
            "--bootstrap",
            &hs[0].tcp_addr(),
            "--mailbox-after-secs",
            "2",
        ],
    );
    eventually(T, "a knows the three holders", || {
        (a.json(&["status"])["routing_table_peers"].as_u64()? >= 3).then_some(())
    });
    let id = send(&a, &b_id, "follows the key");
    wait_deposited(&a, &id, 3);
    a.terminate();

    // Three new peers, each closer to B's key than every first holder.
    let nearest = hs
        .iter()
        .map(|h| distance_to_mailbox(&h.peer_id, &b_id))
        .min()
        .expect("three holders");
    let mut ns = Vec::new();
    for i in 0..3 {
        let dir = root.join(format!("n{i}"));
        let n_id = loop {
            let (_, n_id) = new_identity(&dir);
            if distance_to_mailbox(&n_id, &b_id) < nearest {
                break n_id;
            }
        };
        let n = Daemon::start(&dir, &["--bootstrap", &hs[0].tcp_addr()]);
        assert_eq!(n.peer_id, n_id);
        ns.push(n);
    }
    // The holders pass their copies on to the new closest peers.
    eventually(T, "the new closest peers hold the envelope", || {
        ns.iter().all(|n| held(n) == 1).then_some(())
    });

    // Every first holder leaves; B comes later and still gets the letter.
    for h in &mut hs {
        h.terminate();
    }
    let b = Daemon::start(&root.join("b"), &["--bootstrap", &ns[0].tcp_addr()]);
    assert_eq!(b.peer_id, b_id);
    wait_received(&b, &a.peer_id, &["follows the key"]);
}

#[test]
fn a_ble_neighbour_met_later_gets_a_courier_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let medium = Medium::start(root, &[]);
    let fast = ["--mailbox-after-secs", "2"];
    let x = offline_with(&root.join("x"), &medium, "0,0", &fast);
    let y = offline_with(&root.join("y"), &medium, "10,0", &fast);
    let w = offline_with(&root.join("w"), &medium, "400,0", &fast);
    wait_ble_link(&x, &y);
    // Z never comes: the message stays undelivered.
    let z = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let id = send(&x, &z, "for whoever meets Z");
    assert_eq!(wait_deposited(&x, &id, 1), vec![y.peer_id.clone()]);

    // W comes into X's range after the deposit: it gets a copy too.
    medium.move_to(&crate::ble::device(&w), "0,10");
    wait_ble_link(&x, &w);
    let holders = wait_deposited(&x, &id, 2);
    assert!(holders.contains(&w.peer_id), "{holders:?}");
    assert_eq!(held(&w), 1);
    assert_eq!(held(&y), 1);
}

#[test]
fn holders_that_refuse_are_replaced_by_the_next_closest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (_, b_id) = new_identity(&root.join("b"));
    // Four peers; the three closest to B's key hold nothing for others.
    let mut ids: Vec<(String, std::path::PathBuf)> = (0..4)
        .map(|i| {
            let dir = root.join(format!("p{i}"));
            (new_identity(&dir).1, dir)
        })
        .collect();
    ids.sort_by_key(|(id, _)| distance_to_mailbox(id, &b_id));
    let mut ps: Vec<Daemon> = Vec::new();
    for (i, (id, dir)) in ids.iter().enumerate() {
        let mut args: Vec<String> = Vec::new();
        if let Some(first) = ps.first() {
            args.extend(["--bootstrap".to_owned(), first.tcp_addr()]);
        }
        if i < 3 {
            args.push("--no-mailbox".to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Daemon::start(dir, &args);
        assert_eq!(&p.peer_id, id);
        ps.push(p);
    }
    let a = Daemon::start(
        &root.join("a"),
        &[
            "--bootstrap",
            &ps[0].tcp_addr(),
            "--mailbox-after-secs",
            "2",
        ],
    );
    eventually(T, "a knows the four peers", || {
        (a.json(&["status"])["routing_table_peers"].as_u64()? >= 4).then_some(())
    });
    let id = send(&a, &b_id, "held by the fourth closest");
    // The three closest refuse; the fourth takes their place, and the
    // outbox says so.
    assert_eq!(wait_deposited(&a, &id, 1), vec![ps[3].peer_id.clone()]);
    assert_eq!(held(&ps[3]), 1);
    for p in &ps[..3] {
        assert_eq!(held(p), 0);
    }
}
