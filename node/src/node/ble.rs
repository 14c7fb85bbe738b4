//! BLE neighbours: what the radio hears, and the dials the rule of
//! [`fogmesh_ble::Neighbours`] asks for (when the policy lets BLE carry
//! unicast traffic at all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_ble::{DeviceAddr, DialRules, Links, Neighbour, Neighbours, Radio};
use fogmesh_protocols::policy::Route;
use futures::StreamExt;
use futures::stream::BoxStream;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{PeerId, Swarm};

use super::event_loop::Ctx;
use crate::behaviour::Behaviour;
use crate::types::BleStatus;

/// How often the node retries BLE neighbours it is not linked to.
pub(super) const TICK: Duration = Duration::from_secs(2);

/// The radio, its scan, and the neighbours heard.
pub(super) struct BleNet {
    radio: Arc<dyn Radio>,
    scan: Option<BoxStream<'static, Neighbour>>,
    neighbours: Neighbours,
}

/// The next thing the radio heard; pending for ever when there is no radio
/// or its scan ended. `None` when the scan just ended.
pub(super) async fn next_neighbour(ble: &mut Option<BleNet>) -> Option<Neighbour> {
    match ble.as_mut().and_then(|b| b.scan.as_mut()) {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl BleNet {
    pub(super) fn new(radio: Arc<dyn Radio>, local: &PeerId) -> Self {
        BleNet {
            scan: Some(radio.scan()),
            radio,
            neighbours: Neighbours::new(fogmesh_ble::peer_hint(local), DialRules::default()),
        }
    }

    /// The radio stopped scanning: no more neighbours will be heard.
    pub(super) fn scan_ended(&mut self) {
        tracing::warn!("the BLE radio stopped scanning");
        self.scan = None;
    }

    /// Takes in what the radio heard; returns a device to consider dialling.
    pub(super) fn on_neighbour(&mut self, n: Neighbour) -> Option<DeviceAddr> {
        match &n {
            Neighbour::Found { device, .. } => tracing::trace!(%device, "BLE neighbour heard"),
            Neighbour::Lost { device } => tracing::debug!(%device, "BLE neighbour lost"),
        }
        self.neighbours.on_event(n, Instant::now())
    }

    /// Dials `device` if the policy allows BLE and the rule says so.
    pub(super) fn dial(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        device: DeviceAddr,
        links: &Links,
    ) {
        if !ctx.unicast_routes().contains(&Route::Ble) {
            return;
        }
        if self.neighbours.dial(device, links, Instant::now()) {
            dial_device(swarm, device);
        }
    }

    /// Periodic: dials every neighbour the rule says is due.
    pub(super) fn dial_due(&mut self, swarm: &mut Swarm<Behaviour>, ctx: &Ctx, links: &Links) {
        if !ctx.unicast_routes().contains(&Route::Ble) {
            return;
        }
        for device in self.neighbours.due(links, Instant::now()) {
            dial_device(swarm, device);
        }
    }

    /// The BLE part of `GET /v1/status`.
    pub(super) fn status(&self, links: usize) -> BleStatus {
        BleStatus {
            device: self.radio.address().to_string(),
            neighbours: self.neighbours.len(),
            links,
            link_bandwidth: self.radio.limits().bandwidth,
        }
    }
}

fn dial_device(swarm: &mut Swarm<Behaviour>, device: DeviceAddr) {
    let opts = DialOpts::unknown_peer_id()
        .address(fogmesh_ble::device_multiaddr(device))
        .build();
    tracing::debug!(%device, "dialling a BLE neighbour");
    if let Err(e) = swarm.dial(opts) {
        tracing::debug!(%device, "BLE dial refused: {e}");
    }
}
