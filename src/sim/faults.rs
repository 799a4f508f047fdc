//! The fault injector: crashes, partitions, one-way links, leader isolation, bad weather and
//! leadership transfers during the fault phase, and healing at its end.

use crate::NodeId;
use rand::RngExt;

use crate::sim::invariants::Violation;
use crate::sim::{Action, Sim, SimProtocol};

impl<P: SimProtocol> Sim<P> {
    /// Turns the fault injector on (if the profile has any faults).
    pub fn start_faults(&mut self) {
        if self.config.faults.mean_interval_us > 0 && self.config.faults.total_weight() > 0 {
            self.faults_active = true;
            self.schedule_next_fault();
        }
        if self.config.churn_us > 0 {
            self.faults_active = true;
            self.schedule_churn();
        }
    }

    fn schedule_churn(&mut self) {
        let mean = self.config.churn_us;
        let at = self.now_us + self.rng.random_range(mean / 2..=mean * 3 / 2);
        self.schedule(at, Action::Churn);
    }

    /// Churn: a membership change now, and the next one scheduled.
    pub(super) fn churn(&mut self) {
        if !self.faults_active {
            return;
        }
        self.schedule_churn();
        self.change_members();
    }

    /// Makes up a random membership change from the leader's membership, if there is a
    /// leader, and asks it of the leader, or one time in four of another node (a Raft follower
    /// forwards it to the leader it knows).
    fn change_members(&mut self) {
        let Some(leader) = self.leader() else {
            return;
        };
        let nodes = self.node_ids();
        let entropy = self.rng.random::<u64>();
        let control = self
            .node(leader)
            .and_then(|core| core.change_members(&nodes, entropy));
        let others: Vec<NodeId> = nodes.iter().copied().filter(|&id| id != leader).collect();
        let asked = if entropy >> 62 == 0 && !others.is_empty() {
            others[(entropy >> 32) as usize % others.len()]
        } else {
            leader
        };
        if let Some(control) = control {
            self.membership_changes_asked += 1;
            self.control(asked, control);
        }
    }

    pub(super) fn schedule_next_fault(&mut self) {
        let mean = self.config.faults.mean_interval_us;
        let at = self.now_us + self.rng.random_range(mean / 4..=mean * 7 / 4);
        self.schedule(at, Action::Fault);
    }

    pub(super) fn random_duration(&mut self, max_us: u64) -> u64 {
        self.rng.random_range(max_us / 10..=max_us.max(1))
    }

    pub(super) fn inject_fault(&mut self) {
        if !self.faults_active {
            return;
        }
        self.schedule_next_fault();
        let false_hints = self.config.connection_hints.false_hint_probability;
        if false_hints > 0.0 && self.rng.random_bool(false_hints.min(1.0)) {
            self.false_hint();
        }
        let f = self.config.faults.clone();
        let mut pick = self.rng.random_range(0..f.total_weight());
        let mut chosen = 0;
        for (i, weight) in [
            f.crash,
            f.crash_leader,
            f.partition,
            f.one_way,
            f.isolate_leader,
            f.weather,
            f.transfer,
            f.membership,
        ]
        .into_iter()
        .enumerate()
        {
            if pick < weight {
                chosen = i;
                break;
            }
            pick -= weight;
        }
        let n = self.nodes.len();
        let leader = self.leader();
        match chosen {
            0 | 1 => {
                let target = if chosen == 1 { leader } else { None }
                    .unwrap_or_else(|| NodeId(self.rng.random_range(1..=n as u64)));
                if self.node(target).is_some() {
                    self.crash(target);
                    let at = self.now_us + self.random_duration(f.max_down_us);
                    self.schedule(
                        at,
                        Action::Restart {
                            node: target.0 as usize - 1,
                        },
                    );
                }
            }
            2 => {
                let mut ids = self.node_ids();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, self.rng.random_range(0..=i));
                }
                let cut = self.rng.random_range(1..n);
                self.trace(|| {
                    let side = |ids: &[NodeId]| {
                        ids.iter()
                            .map(NodeId::to_string)
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    format!("partition {} | {}", side(&ids[..cut]), side(&ids[cut..]))
                });
                self.network.partition(&ids[..cut], &ids[cut..]);
                let at = self.now_us + self.random_duration(f.max_fault_us);
                self.schedule(at, Action::Heal);
            }
            3 => {
                for _ in 0..self.rng.random_range(1..=n) {
                    let from = NodeId(self.rng.random_range(1..=n as u64));
                    let to = NodeId(self.rng.random_range(1..=n as u64));
                    if from != to {
                        self.trace(|| format!("block {from} -> {to}"));
                        self.network.block(from, to);
                    }
                }
                let at = self.now_us + self.random_duration(f.max_fault_us);
                self.schedule(at, Action::Heal);
            }
            4 => {
                if let Some(leader) = leader {
                    self.trace(|| format!("isolate the leader {leader}"));
                    self.network.isolate(leader);
                    let at = self.now_us + self.random_duration(f.max_fault_us);
                    self.schedule(at, Action::Heal);
                }
            }
            5 => {
                let mut weather = self.config.network;
                weather.drop_probability = self.rng.random_range(0.0..0.3);
                weather.duplicate_probability = self.rng.random_range(0.0..0.2);
                weather.latency.tail_probability = self.rng.random_range(0.0..0.2);
                weather.latency.tail_max_us =
                    weather.latency.max_us + self.rng.random_range(0..300_000);
                self.trace(|| format!("bad weather {weather:?}"));
                if let Err(e) = self.network.set_config(weather) {
                    self.fail(Violation::Scenario {
                        detail: format!("weather: {e}"),
                    });
                }
                let at = self.now_us + self.random_duration(f.max_fault_us);
                self.schedule(at, Action::RestoreWeather);
            }
            6 => {
                if let Some(leader) = leader {
                    let to = NodeId(self.rng.random_range(1..=n as u64));
                    if let Some(control) = P::transfer_to(to) {
                        self.control(leader, control);
                    }
                }
            }
            _ => self.change_members(),
        }
    }

    /// Ends the fault phase: no more faults, every link restored (the twins' sides hear each
    /// other, the twins themselves still only their own side), the healthy network back, every
    /// crashed node restarted.
    pub fn heal_everything(&mut self) {
        self.trace(|| "end of the fault phase: heal everything".to_string());
        self.faults_active = false;
        self.sides_joined = true;
        self.agenda.retain(|_, action| {
            !matches!(
                action,
                Action::Fault
                    | Action::Churn
                    | Action::Heal
                    | Action::RestoreWeather
                    | Action::Restart { .. }
            )
        });
        self.network.heal();
        if let Err(e) = self.network.set_config(self.config.network) {
            self.fail(Violation::Scenario {
                detail: format!("network settings: {e}"),
            });
        }
        for index in 0..self.nodes.len() {
            self.restart(index);
        }
    }
}
