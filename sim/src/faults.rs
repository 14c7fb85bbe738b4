//! Faults: partitions of the modelled network and churn of nodes, each a
//! window of model time from the plan, turned into [`Fault`]s applied to
//! the world at their times.

use crate::plan::WorkloadOut;
use crate::record::{FaultKind, FaultWindow};
use crate::world::World;

/// One change the world undergoes.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The network splits: `side` on one side, every other node on the
    /// other. Connections across close, dials across fail.
    Partition {
        /// The small side.
        side: Vec<usize>,
    },
    /// The partition heals.
    Heal,
    /// These nodes stop, as at a SIGTERM.
    Stop {
        /// The nodes.
        nodes: Vec<usize>,
    },
    /// These nodes start again from their own data.
    Restart {
        /// The nodes.
        nodes: Vec<usize>,
    },
}

/// A fault and when it happens.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedFault {
    /// Model ms after the workload starts.
    pub at_ms: f64,
    /// What happens.
    pub fault: Fault,
}

/// The planned faults, in time order, and their windows for the report.
pub fn schedule(workload: &WorkloadOut) -> (Vec<TimedFault>, Vec<FaultWindow>) {
    let mut faults = Vec::new();
    let mut windows = Vec::new();
    for p in &workload.partitions {
        faults.push(TimedFault {
            at_ms: p.start_ms,
            fault: Fault::Partition {
                side: p.nodes.clone(),
            },
        });
        faults.push(TimedFault {
            at_ms: p.end_ms,
            fault: Fault::Heal,
        });
        windows.push(FaultWindow {
            kind: FaultKind::Partition,
            start_ms: p.start_ms,
            end_ms: p.end_ms,
        });
    }
    for c in &workload.churn {
        faults.push(TimedFault {
            at_ms: c.start_ms,
            fault: Fault::Stop {
                nodes: c.nodes.clone(),
            },
        });
        faults.push(TimedFault {
            at_ms: c.end_ms,
            fault: Fault::Restart {
                nodes: c.nodes.clone(),
            },
        });
        windows.push(FaultWindow {
            kind: FaultKind::Churn,
            start_ms: c.start_ms,
            end_ms: c.end_ms,
        });
    }
    // Stable: at equal times, partitions before churn, starts before ends.
    faults.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    (faults, windows)
}

/// Applies `fault` to `world` now.
pub async fn apply(world: &mut World, fault: Fault) {
    match fault {
        Fault::Partition { side } => {
            world.partition(&side);
            tracing::info!(nodes = side.len(), "partition");
        }
        Fault::Heal => {
            world.heal();
            tracing::info!("partition healed");
        }
        Fault::Stop { nodes } => {
            for &i in &nodes {
                world.stop(i).await;
            }
            tracing::info!(nodes = nodes.len(), up = false, "churn");
        }
        Fault::Restart { nodes } => {
            for &i in &nodes {
                if let Err(e) = world.start(i).await {
                    tracing::warn!(node = i, "restart failed: {e:#}");
                }
            }
            tracing::info!(nodes = nodes.len(), up = true, "churn");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::FaultNodes;

    /// Faults come out in time order, each window as its start and end.
    #[test]
    fn windows_become_faults_in_time_order() {
        let window = |start_ms, end_ms, nodes: &[usize]| FaultNodes {
            start_ms,
            end_ms,
            nodes: nodes.to_vec(),
        };
        let workload = WorkloadOut {
            members: vec![0, 1, 2, 3],
            publishers: vec![0],
            messages: Vec::new(),
            partitions: vec![window(3000.0, 5000.0, &[1, 2])],
            churn: vec![window(1000.0, 4000.0, &[3])],
        };
        let (faults, windows) = schedule(&workload);
        let order: Vec<(f64, Fault)> = faults.into_iter().map(|f| (f.at_ms, f.fault)).collect();
        assert_eq!(
            order,
            [
                (1000.0, Fault::Stop { nodes: vec![3] }),
                (3000.0, Fault::Partition { side: vec![1, 2] }),
                (4000.0, Fault::Restart { nodes: vec![3] }),
                (5000.0, Fault::Heal),
            ]
        );
        let kinds: Vec<FaultKind> = windows.iter().map(|w| w.kind).collect();
        assert_eq!(kinds, [FaultKind::Partition, FaultKind::Churn]);
    }
}
