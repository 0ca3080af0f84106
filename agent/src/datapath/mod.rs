//! The datapath: loads the eBPF object, writes its maps, attaches its
//! programs and reads its counters. It takes decisions from `policy` and
//! `config`, never the other way round.

mod attach;
pub mod cgroups;
mod health;
mod nodes;
pub mod pins;
pub mod redirect;
pub mod tc_classic;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray},
};
use smtpgate_common::{
    self as common, Counter, Family, PORT_WORDS, Reason, Verdict, counters,
    events::{SourceKey, SourceStats},
    exceptions::ExceptionPorts,
};

pub use attach::{AttachMode, Attachment, LinkLayer, remove_classic_filters, tcx_supported};
pub use health::{Down, expected_programs, tc_programs};
use nodes::NodeRegion;
pub use pins::PinDir;

use crate::{
    config::{Action, Mode},
    policy::{Table, TableFull},
};

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpgate-ebpf"));

/// How long a table half stays untouched after it stops being the active
/// one. Programs read the active index, then walk that half; TC and cgroup
/// programs run to completion in microseconds without sleeping, so a packet
/// that read the old index is long done after this.
const GRACE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this binary was built without its eBPF programs (AYA_BUILD_SKIP); rebuild without it")]
    NoObject,
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("{op}")]
    Map {
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{op}")]
    Program {
        op: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("mapping the allowlist table into memory")]
    Mmap(#[source] std::io::Error),
    #[error(transparent)]
    TableFull(#[from] TableFull),
    #[error("pinning under {path}")]
    Pins {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy routing for redirect: {what}")]
    Routing { what: String },
    #[error("interface {name:?} not found")]
    NoInterface { name: String },
    #[error(
        "interface {interface:?} is a {kind} device (ARPHRD {arphrd}), which smtpgate cannot classify: {}",
        attach::unsupported_hint(*.arphrd)
    )]
    UnsupportedDevice {
        interface: String,
        arphrd: u16,
        kind: &'static str,
    },
    #[error("asking the kernel what kind of device {interface:?} is")]
    DeviceType {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "datapath.tc_mode = \"tcx\", but this kernel has no TCX (it came in Linux 6.6): \
         use \"auto\" or \"classic\""
    )]
    NoTcx,
    #[error("asking the kernel whether it has TCX")]
    TcxProbe(#[source] std::io::Error),
    #[error("{op}")]
    Classic {
        op: String,
        #[source]
        source: tc_classic::ClassicError,
    },
}

/// Summed counters for one (family, verdict, reason).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CounterRow {
    pub family: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub packets: u64,
    pub connections: u64,
}

/// Sizing for a table of `needed` nodes: room for it to double, and never
/// below the configured minimum.
#[must_use]
pub fn table_capacity(needed: usize, configured: u32) -> u32 {
    if configured != 0 {
        return configured;
    }
    let want = (needed * 2).max(crate::config::MIN_TABLE_NODES as usize);
    u32::try_from(want)
        .unwrap_or(crate::config::MAX_TABLE_NODES)
        .min(crate::config::MAX_TABLE_NODES)
}

pub struct Datapath {
    ebpf: Ebpf,
    config: Array<MapData, common::Config>,
    ports: Array<MapData, u64>,
    counters: PerCpuArray<MapData, Counter>,
    relay: aya::maps::SockMap<MapData>,
    top: aya::maps::HashMap<MapData, SourceKey, SourceStats>,
    exceptions: aya::maps::LpmTrie<MapData, common::exceptions::ExceptionKey, ExceptionPorts>,
    budget: PerCpuArray<MapData, common::events::Budget>,
    /// What `exceptions` holds, as last written.
    installed_exceptions: BTreeMap<(u32, common::exceptions::ExceptionKey), ExceptionPorts>,
    /// Taken by the agent's event reader.
    events: Option<aya::maps::RingBuf<MapData>>,
    nodes: NodeRegion,
    /// Kept open: programs loaded later are relocated against this fd.
    _node_map: MapData,
    settings: common::Config,
    last_flip: Option<Instant>,
    attached: Vec<Attachment>,
    pins: PinDir,
    /// Whether the maps were adopted from an earlier agent's pins.
    adopted: bool,
    /// Links this agent created and pinned; the pins keep them attached,
    /// these only keep them open while the agent runs.
    links: std::collections::HashMap<String, aya::programs::links::PinnedLink>,
    /// How TC points attach; chosen by `set_tc_mode`, or on the first TC
    /// attach as `auto` would.
    tc_mode: Option<AttachMode>,
    /// The intercept listeners in the relay SOCKMAP, by index, kept to fill
    /// a successor's (see `successor`).
    relay_listeners: Vec<(u32, std::net::TcpListener)>,
    /// What predecessors counted (see `absorb`), by slot: the counters an
    /// admin sees never go back when the maps are replaced.
    carried: Vec<Counter>,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::MissingMap { name })
}

fn map_err(op: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { op, source }
}

const MAP_NAMES: &[&str] = common::maps::ALL;

/// One row of [`Datapath::top`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopEntry {
    /// None for a local socket denied before it had a source address.
    pub source: Option<std::net::IpAddr>,
    /// The cgroup id of a local process; 0 for forwarded traffic.
    pub cgroup: u64,
    pub attempts: u64,
    /// CLOCK_MONOTONIC.
    pub last_seen_ns: u64,
    pub verdict: &'static str,
    /// 0 where the hook could not know.
    pub pid: u32,
    pub comm: Option<String>,
}

/// A kernel command name: NUL-padded bytes, not always UTF-8.
#[must_use]
pub fn comm(bytes: &[u8; 16]) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// The shape each pinned map must have for this agent's programs: (name,
/// key size, value size, entries; 0 for "any"). A map an older agent pinned
/// with another shape (a field added to the config, a counter slot more)
/// cannot be adopted: the programs would read past its values.
fn expected_shapes() -> [(&'static str, u32, u32, u32); 7] {
    use common::{events, maps};
    let size = |n: usize| n as u32;
    [
        (maps::CONFIG, 4, size(size_of::<common::Config>()), 1),
        (maps::PORTS, 4, 8, common::PORT_WORDS),
        (
            maps::ALLOW_NODES,
            4,
            size(size_of::<common::table::Node>()),
            0,
        ),
        (
            maps::COUNTERS,
            4,
            size(size_of::<Counter>()),
            common::counters::SLOTS,
        ),
        (
            maps::TOP,
            size(size_of::<SourceKey>()),
            size(size_of::<SourceStats>()),
            events::TOP_ENTRIES,
        ),
        (maps::RELAY, 4, 4, 2),
        (
            maps::EXCEPTIONS,
            4 + size(size_of::<common::exceptions::ExceptionKey>()),
            size(size_of::<ExceptionPorts>()),
            common::exceptions::MAX_ENTRIES,
        ),
    ]
}

/// Nodes per table of the pinned maps, if a complete set of this layout's
/// maps is pinned, each of the shape this agent's programs expect.
fn pinned_capacity(pins: &PinDir) -> Option<u32> {
    if !MAP_NAMES.iter().all(|m| pins.map(m).exists()) {
        return None;
    }
    for (name, key, value, entries) in expected_shapes() {
        let info = MapData::from_pin(pins.map(name)).ok()?.info().ok()?;
        let fits = info.key_size() == key
            && info.value_size() == value
            && (entries == 0 || info.max_entries() == entries);
        if !fits {
            tracing::warn!(
                map = name,
                "the pinned maps were made by an agent of another version; starting with fresh ones (counters restart at zero)"
            );
            return None;
        }
    }
    let nodes = MapData::from_pin(pins.map(common::maps::ALLOW_NODES)).ok()?;
    Some(nodes.info().ok()?.max_entries() / 2)
}

impl Datapath {
    /// Loads the eBPF object. If an earlier agent left its maps pinned and
    /// they are big enough, they are adopted: the policy they hold keeps
    /// being enforced by the programs already attached, with no gap.
    /// Otherwise fresh maps are made, with tables of `configured` nodes
    /// (0: sized from `needed`). Nothing new is attached yet; fresh tables
    /// deny every SMTP source.
    pub fn load(pins: PinDir, configured: u32, needed: usize) -> Result<Self, DatapathError> {
        Self::load_inner(pins, configured, needed, true)
    }

    fn load_inner(
        pins: PinDir,
        configured: u32,
        needed: usize,
        may_adopt: bool,
    ) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        pins.ensure().map_err(|source| DatapathError::Pins {
            path: pins.root().to_owned(),
            source,
        })?;
        let pinned = pinned_capacity(&pins).filter(|_| may_adopt);
        let adopted =
            pinned.is_some_and(|n| n as usize >= needed && (configured == 0 || configured == n));
        let nodes_per_table = match pinned {
            Some(n) if adopted => n,
            _ => table_capacity(needed, configured),
        };
        let map_paths: Vec<_> = MAP_NAMES.iter().map(|m| pins.map(m)).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(common::maps::ALLOW_NODES, 2 * nodes_per_table);
        if adopted {
            for (name, path) in MAP_NAMES.iter().zip(&map_paths) {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;
        if !adopted {
            // Fresh maps replace older pins. The old maps live on while the
            // programs attached to them do, until attach() swaps those.
            for (name, path) in MAP_NAMES.iter().zip(&map_paths) {
                let pin_err = |source| DatapathError::Pins {
                    path: path.clone(),
                    source,
                };
                pins::unpin(path).map_err(pin_err)?;
                let map = ebpf.map(name).ok_or(DatapathError::MissingMap { name })?;
                map.pin(path)
                    .map_err(|e| pin_err(std::io::Error::other(e.to_string())))?;
            }
        }
        let config = Array::try_from(take_map(&mut ebpf, common::maps::CONFIG)?)
            .map_err(map_err("opening the config map"))?;
        let ports = Array::try_from(take_map(&mut ebpf, common::maps::PORTS)?)
            .map_err(map_err("opening the ports map"))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, common::maps::COUNTERS)?)
            .map_err(map_err("opening the counters map"))?;
        let relay = aya::maps::SockMap::try_from(take_map(&mut ebpf, common::maps::RELAY)?)
            .map_err(map_err("opening the relay SOCKMAP"))?;
        let top = aya::maps::HashMap::try_from(take_map(&mut ebpf, common::maps::TOP)?)
            .map_err(map_err("opening the top map"))?;
        let budget = PerCpuArray::try_from(take_map(&mut ebpf, common::maps::EVENT_BUDGET)?)
            .map_err(map_err("opening the event budget map"))?;
        let exceptions =
            aya::maps::LpmTrie::try_from(take_map(&mut ebpf, common::maps::EXCEPTIONS)?)
                .map_err(map_err("opening the exceptions map"))?;
        // Adopted: what an earlier agent left is what the programs enforce
        // now; the new config is diffed against it.
        let installed_exceptions = exceptions
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| ((k.prefix_len(), k.data()), v))
            .collect();
        let events = aya::maps::RingBuf::try_from(take_map(&mut ebpf, common::maps::EVENTS)?)
            .map_err(map_err("opening the events ring buffer"))?;
        let Map::Array(node_map) = take_map(&mut ebpf, common::maps::ALLOW_NODES)? else {
            return Err(DatapathError::MissingMap {
                name: common::maps::ALLOW_NODES,
            });
        };
        let nodes = NodeRegion::map(node_map.fd(), 2 * nodes_per_table as usize)
            .map_err(DatapathError::Mmap)?;
        // Adopted maps carry the settings the running programs enforce:
        // keep them until the new config is written over them.
        let settings = if adopted {
            config
                .get(&0, 0)
                .map_err(map_err("reading the config map"))?
        } else {
            common::Config {
                nodes_per_table,
                action: common::Action::Drop as u32,
                other_action: common::Action::Drop as u32,
                mode: common::Mode::Enforce as u32,
                ..common::Config::ZERO
            }
        };
        let mut dp = Self {
            ebpf,
            config,
            ports,
            counters,
            relay,
            top,
            exceptions,
            budget,
            installed_exceptions,
            events: Some(events),
            nodes,
            _node_map: node_map,
            settings,
            last_flip: None,
            attached: Vec::new(),
            pins,
            adopted,
            links: std::collections::HashMap::new(),
            tc_mode: None,
            relay_listeners: Vec::new(),
            carried: vec![Counter::default(); counters::SLOTS as usize],
        };
        if !adopted {
            dp.write_settings()?;
        }
        Ok(dp)
    }

    /// Whether this datapath took over an earlier agent's pinned maps.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    fn write_settings(&mut self) -> Result<(), DatapathError> {
        self.config
            .set(0, self.settings, 0)
            .map_err(map_err("writing the config map"))
    }

    /// Sets what denied sources get: `action` on port 25, `other` on the
    /// other SMTP ports (see `smtpgate_common::verdict`).
    pub fn set_action(
        &mut self,
        mode: Mode,
        action: Action,
        other: Action,
    ) -> Result<(), DatapathError> {
        let word = |a: Action| {
            (match a {
                Action::Drop => common::Action::Drop,
                Action::Reject => common::Action::Reject,
                Action::Redirect => common::Action::Redirect,
            }) as u32
        };
        self.settings.mode = match mode {
            Mode::Enforce => common::Mode::Enforce,
            Mode::Audit => common::Mode::Audit,
        } as u32;
        self.settings.action = word(action);
        self.settings.other_action = word(other);
        self.write_settings()
    }

    /// The settings the programs enforce, as last written.
    #[must_use]
    pub fn settings(&self) -> &common::Config {
        &self.settings
    }

    /// Lets the relay's delivery sockets out: those with
    /// [`common::RELAY_MARK`] in cgroup `id` (0: none).
    pub fn set_relay_cgroup(&mut self, id: u64) -> Result<(), DatapathError> {
        if self.settings.relay_cgroup != id {
            self.settings.relay_cgroup = id;
            self.write_settings()?;
        }
        Ok(())
    }

    /// Tells the cgroup connect hooks whether any of this host's own
    /// addresses is allowlisted, per family.
    pub fn set_local_allowed(&mut self, v4: bool, v6: bool) -> Result<(), DatapathError> {
        let flags =
            u32::from(v4) * common::LOCAL_V4_ALLOWED | u32::from(v6) * common::LOCAL_V6_ALLOWED;
        if flags != self.settings.local_allowed {
            self.settings.local_allowed = flags;
            self.write_settings()?;
        }
        Ok(())
    }

    /// Sets the ports that count as SMTP. Words are written one by one, so
    /// a port being added or removed changes at one instant; the others
    /// never flicker.
    pub fn set_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), DatapathError> {
        let mut words = [0u64; PORT_WORDS as usize];
        for p in ports {
            words[usize::from(*p) / 64] |= 1 << (p % 64);
        }
        for (i, w) in words.iter().enumerate() {
            let i = i as u32;
            let old = self
                .ports
                .get(&i, 0)
                .map_err(map_err("reading the ports map"))?;
            if old != *w {
                self.ports
                    .set(i, *w, 0)
                    .map_err(map_err("writing the ports map"))?;
            }
        }
        Ok(())
    }

    /// Nodes per table half.
    #[must_use]
    pub fn table_capacity(&self) -> usize {
        self.settings.nodes_per_table as usize
    }

    /// A datapath like this one but with tables of room for `needed`
    /// nodes: a new instance of the programs with fresh, bigger maps (pinned
    /// in place of these), holding the same settings (relay port and cgroup
    /// included) and intercept listeners. Nothing is attached: the caller
    /// writes the policy (ports, actions, exceptions, table) and attaches it
    /// at every point, which swaps the programs into the pinned
    /// links one by one (BPF_LINK_UPDATE, as an upgrade does). Until a
    /// link is swapped it keeps running the old programs on the old maps,
    /// so every packet meets one whole policy or the other.
    pub fn successor(&self, needed: usize) -> Result<Datapath, DatapathError> {
        let mut next = Self::load_inner(self.pins.clone(), 0, needed, false)?;
        next.settings = common::Config {
            active_table: 0,
            nodes_per_table: next.settings.nodes_per_table,
            ..self.settings
        };
        next.write_settings()?;
        for (i, l) in &self.relay_listeners {
            next.relay
                .set(*i, l, 0)
                .map_err(map_err("writing the relay SOCKMAP"))?;
            let clone = l.try_clone().map_err(|source| DatapathError::Pins {
                path: self.pins.root().to_owned(),
                source,
            })?;
            next.relay_listeners.push((*i, clone));
        }
        next.tc_mode = self.tc_mode;
        Ok(next)
    }

    /// Makes the exceptions map hold `exceptions` (prefix, ports): new and
    /// changed entries first, then the count the programs check, then the
    /// removals. Each entry changes at one instant; an entry that stays is
    /// never absent.
    pub fn set_exceptions(
        &mut self,
        exceptions: impl IntoIterator<Item = (crate::policy::Prefix, ExceptionPorts)>,
    ) -> Result<(), DatapathError> {
        let wanted = exceptions
            .into_iter()
            .map(|(prefix, ports)| {
                let net = prefix.net();
                let (family, bytes) = match net.addr() {
                    std::net::IpAddr::V4(a) => (4u8, a.octets().to_vec()),
                    std::net::IpAddr::V6(a) => (6u8, a.octets().to_vec()),
                };
                let key = common::exceptions::key_data(family, &bytes);
                ((8 + u32::from(net.prefix_len()), key), ports)
            })
            .collect::<BTreeMap<_, _>>();
        use aya::maps::lpm_trie::Key;
        for (k, v) in &wanted {
            if self.installed_exceptions.get(k) != Some(v) {
                self.exceptions
                    .insert(&Key::new(k.0, k.1), *v, 0)
                    .map_err(map_err("writing the exceptions map"))?;
            }
        }
        let count = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
        if self.settings.exceptions != count {
            self.settings.exceptions = count;
            self.write_settings()?;
        }
        for k in self.installed_exceptions.keys() {
            if !wanted.contains_key(k) {
                self.exceptions
                    .remove(&Key::new(k.0, k.1))
                    .map_err(map_err("removing from the exceptions map"))?;
            }
        }
        self.installed_exceptions = wanted;
        Ok(())
    }

    /// Takes over what a predecessor counted and who it saw denied, once
    /// every link runs this datapath's programs.
    pub fn absorb(&mut self, old: &Datapath) {
        if let Ok(rows) = old.counters() {
            for (slot, row) in self.carried.iter_mut().zip(rows) {
                slot.packets += row.packets;
                slot.connections += row.connections;
            }
        }
        for (k, v) in old.top.iter().filter_map(Result::ok) {
            // BPF_NOEXIST (1): an entry the new programs made already is
            // newer.
            let _ = self.top.insert(k, v, 1);
        }
    }

    /// Installs a new allowlist table atomically: it is written into the
    /// inactive half, then one word switches the programs over. A packet
    /// sees the whole old table or the whole new one.
    pub fn install(&mut self, table: &Table) -> Result<(), DatapathError> {
        let per = self.settings.nodes_per_table as usize;
        if table.len() > per {
            return Err(TableFull {
                needed: table.len(),
                capacity: per,
            }
            .into());
        }
        if let Some(at) = self.last_flip {
            let since = at.elapsed();
            if since < GRACE {
                std::thread::sleep(GRACE - since);
            }
        }
        let next = 1 - (self.settings.active_table & 1);
        let base = next as usize * per;
        let region = self.nodes.slice_mut(base, per);
        // Nodes past the new table's length are unreachable from it and are
        // left as they are.
        table.write_to(&mut region[..table.len()], base as u32)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.settings.active_table = next;
        self.write_settings()?;
        self.last_flip = Some(Instant::now());
        Ok(())
    }

    /// Reads every counter, summed over CPUs, in [`counters::index`] order.
    pub fn counters(&self) -> Result<Vec<CounterRow>, DatapathError> {
        let mut rows = Vec::with_capacity(counters::SLOTS as usize);
        for family in Family::ALL {
            for verdict in Verdict::ALL {
                for reason in Reason::ALL {
                    let idx = counters::index(family, verdict, reason);
                    let per_cpu = self
                        .counters
                        .get(&idx, 0)
                        .map_err(map_err("reading the counters map"))?;
                    let carried = self.carried.get(idx as usize).copied().unwrap_or_default();
                    let (packets, connections) = per_cpu
                        .iter()
                        .fold((carried.packets, carried.connections), |(p, c), v| {
                            (p + v.packets, c + v.connections)
                        });
                    rows.push(CounterRow {
                        family: family.as_str(),
                        verdict: verdict.as_str(),
                        reason: reason.as_str(),
                        packets,
                        connections,
                    });
                }
            }
        }
        Ok(rows)
    }

    /// Runs a TC program once per `repeat` on `packet` with
    /// BPF_PROG_TEST_RUN, loading it first if needed: the program's return
    /// code and the kernel's mean time per run. For benchmarks and tests;
    /// nothing is attached.
    pub fn test_run(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, Duration), DatapathError> {
        use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                op: format!("{name} is not a classifier"),
                source,
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program {
                op: format!("loading {name}"),
                source,
            })?;
        }
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let r = prog
            .test_run(opts)
            .map_err(|source| DatapathError::Program {
                op: format!("test-running {name}"),
                source,
            })?;
        Ok((r.return_value as i32, r.duration))
    }

    /// Loaded programs and their kernel ids.
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_owned(), p.info().ok()?.id())))
            .collect()
    }

    /// The ring buffer of denied attempts, for the one task that reads it.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.take()
    }

    /// Denial events the programs left out for want of budget, summed over
    /// the CPUs since this datapath was loaded.
    pub fn unlogged_events(&self) -> u64 {
        self.budget
            .get(&0, 0)
            .map(|v| v.iter().map(|b| u64::from(b.unlogged)).sum())
            .unwrap_or(0)
    }

    /// The sources denied most, most first: (source, attempts, last seen as
    /// nanoseconds of CLOCK_MONOTONIC, last verdict).
    pub fn top(&self, limit: usize) -> Vec<TopEntry> {
        let mut rows: Vec<_> = self
            .top
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let source = if k.addr == [0; 16] {
                    None
                } else if k.family == Family::Ipv4 as u32 {
                    Some(std::net::IpAddr::from([
                        k.addr[0], k.addr[1], k.addr[2], k.addr[3],
                    ]))
                } else {
                    Some(std::net::IpAddr::from(k.addr))
                };
                TopEntry {
                    source,
                    cgroup: k.cgroup,
                    attempts: v.attempts,
                    last_seen_ns: v.last_seen_ns,
                    verdict: Verdict::ALL
                        .get(v.verdict as usize)
                        .map_or("?", |v| v.as_str()),
                    pid: v.pid,
                    comm: comm(&v.comm),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.attempts
                .cmp(&a.attempts)
                .then(b.last_seen_ns.cmp(&a.last_seen_ns))
        });
        rows.truncate(limit);
        rows
    }

    /// What is attached, in attach order.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attached
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A name is written twice: in `#[map(name = ...)]` / the program's
    /// symbol, and in `smtpgate_common`. This holds the built object to the
    /// constants, both ways, without root.
    #[test]
    fn the_built_object_has_exactly_the_named_maps_and_programs() {
        assert!(
            !OBJECT.is_empty(),
            "built with AYA_BUILD_SKIP: no object to check"
        );
        let obj = aya_obj::Object::parse(OBJECT).expect("parsing the eBPF object");
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|m| !m.starts_with('.'))
            .collect();
        let want: BTreeSet<&str> = common::maps::ALL.iter().copied().collect();
        assert_eq!(maps, want, "maps in the object vs smtpgate_common::maps");
        let progs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = common::programs::ALL.iter().copied().collect();
        assert_eq!(
            progs, want,
            "programs in the object vs smtpgate_common::programs"
        );
    }
}
