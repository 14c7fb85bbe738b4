//! Heap held by one member's state of a large group.
//!
//! Run with `cargo bench -p fogmesh-protocols --bench group_memory`. An
//! admin founds a group of `N` members; then members join from the genesis
//! op (verified, their epoch key opened), as each node of a simulated
//! 1000-node group does. Reported: the genesis op's encoded size, and the
//! heap that one joined `Group` holds (allocated minus freed while it is
//! built, counted by dhat's allocator), for 10 members.

use fogmesh_protocols::groups::group::Group;
use fogmesh_protocols::groups::wire::encode_op;
use libp2p_identity::Keypair;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Bytes allocated and not yet freed.
fn live() -> isize {
    dhat::HeapStats::get().curr_bytes as isize
}

const MEMBERS: [usize; 3] = [100, 300, 1000];
const JOINERS: usize = 10;

fn main() {
    let _heap = dhat::Profiler::builder().testing().build();
    for n in MEMBERS {
        let keys: Vec<Keypair> = (0..n).map(|_| Keypair::generate_ed25519()).collect();
        let ids: Vec<_> = keys.iter().map(|k| k.public().to_peer_id()).collect();
        let (admin_group, ops) =
            Group::create(keys[0].clone(), "big", "", &ids[1..], &mut rand::rng(), 1)
                .expect("create");
        drop(admin_group);
        let genesis = ops.into_iter().next().expect("genesis op");
        let op_bytes = encode_op(&genesis).len();
        let mut held = Vec::new();
        let mut per_group = Vec::new();
        for k in keys.iter().skip(1).take(JOINERS) {
            // The genesis op it is given (a decoded copy, in a node) is
            // counted: the group keeps it.
            let before = live();
            let op = genesis.clone();
            let g = Group::join(k.clone(), op).expect("join");
            per_group.push(live() - before);
            held.push(g);
        }
        per_group.sort_unstable();
        println!(
            "members {n:>5}: genesis op {:>7} bytes encoded; one member's Group holds {:>8} bytes \
             (median of {JOINERS}; min {}, max {}), {:.0} bytes per member",
            op_bytes,
            per_group[JOINERS / 2],
            per_group[0],
            per_group[JOINERS - 1],
            per_group[JOINERS / 2] as f64 / n as f64
        );
    }
}
