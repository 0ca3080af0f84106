//! `cargo xtask bench datapath`: what the classifier costs per packet.
//!
//! BPF_PROG_TEST_RUN runs the TC classifier and a program that only returns
//! "pass" (the yardstick: most of its time is the harness) on the same
//! packets, interleaved sample by sample so that drift on a shared machine
//! hits both alike. Needs root. See BENCHMARKS.md for the method and results.
//!
//! Optional arguments: allowlist sizes to run (default 10 1000 100000
//! 1000000); `--samples N`, `--repeat N`.

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use smtpgate::{
    config::{Action, Mode},
    datapath::{Datapath, PinDir, pins, table_capacity},
    policy::{Allowlist, Prefix},
};
use smtpgate_common::programs::{TC_BASELINE, TC_INGRESS};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const SEED: u64 = 0x5317_9a7e_0025_0025;

fn main() -> anyhow::Result<()> {
    let mut sizes = Vec::new();
    let mut samples = 31;
    let mut repeat = 100_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            // cargo bench passes this to harness = false benches.
            "--bench" => {}
            "--samples" => samples = args.next().context("--samples N")?.parse()?,
            "--repeat" => repeat = args.next().context("--repeat N")?.parse()?,
            n => sizes.push(n.parse::<usize>().with_context(|| format!("size {n:?}"))?),
        }
    }
    if sizes.is_empty() {
        sizes = vec![10, 1_000, 100_000, 1_000_000];
    }
    ensure!(
        nix_is_root(),
        "the datapath benchmark loads eBPF programs: run it as root"
    );
    println!(
        "BPF_PROG_TEST_RUN, {samples} samples of repeat={repeat} per program and packet, \
         interleaved; medians of the kernel's mean ns per run"
    );
    for &n in &sizes {
        bench_size(n, samples, repeat)?;
    }
    bench_exceptions(samples, repeat)?;
    bench_install(100_000)?;
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A pin directory of our own (`Datapath::load` pins its maps), removed on
/// drop so that no table outlives the benchmark.
struct BenchPins(PinDir);

impl BenchPins {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(PinDir::new(format!(
            "/sys/fs/bpf/smtpgate-bench-{}-{n}",
            std::process::id()
        )))
    }

    /// A datapath with `per_half` nodes per table, fresh (never adopted).
    fn load(&self, per_half: u32) -> anyhow::Result<Datapath> {
        let dp = Datapath::load(self.0.clone(), per_half, per_half as usize)?;
        ensure!(
            !dp.adopted(),
            "{} held maps already",
            self.0.root().display()
        );
        Ok(dp)
    }
}

impl Drop for BenchPins {
    fn drop(&mut self) {
        if let Err(e) = pins::remove_tree(self.0.root()) {
            eprintln!("removing {}: {e}", self.0.root().display());
        }
    }
}

// ---------------------------------------------------------------------------
// Probes: the packets whose cost is measured.

/// Benchmark-only address ranges that the generator never draws from, so the
/// probes below are allowed or denied exactly as labelled at every size.
const RESERVED: [&str; 3] = ["198.18.0.0/15", "2001:db8::/32", "3fff::/20"];

struct Probe {
    name: &'static str,
    /// The allowlist prefix this probe needs in the set, if any.
    prefix: Option<&'static str>,
    src: &'static str,
    dport: u16,
    want: i32,
    /// Table nodes the lookup reads: 1 for the 16-bit root, then 1 per
    /// further address byte up to the deciding cell; 0 when not looked up.
    reads: u8,
}

const PROBES: &[Probe] = &[
    Probe {
        name: "v4 tcp/443",
        prefix: None,
        src: "198.19.32.25",
        dport: 443,
        want: TC_ACT_UNSPEC,
        reads: 0,
    },
    Probe {
        name: "v4 25 allow /16",
        prefix: Some("198.18.0.0/16"),
        src: "198.18.25.25",
        dport: 25,
        want: TC_ACT_UNSPEC,
        reads: 1,
    },
    Probe {
        name: "v4 25 allow /24",
        prefix: Some("198.19.24.0/24"),
        src: "198.19.24.25",
        dport: 25,
        want: TC_ACT_UNSPEC,
        reads: 2,
    },
    Probe {
        name: "v4 25 allow /32",
        prefix: Some("198.19.32.25/32"),
        src: "198.19.32.25",
        dport: 25,
        want: TC_ACT_UNSPEC,
        reads: 3,
    },
    Probe {
        name: "v4 25 deny",
        prefix: None,
        src: "198.19.32.26",
        dport: 25,
        want: TC_ACT_SHOT,
        reads: 3,
    },
    Probe {
        name: "v6 tcp/443",
        prefix: None,
        src: "3fff:0:0:128::25",
        dport: 443,
        want: TC_ACT_UNSPEC,
        reads: 0,
    },
    Probe {
        name: "v6 25 allow /32",
        prefix: Some("2001:db8::/32"),
        src: "2001:db8:25::25",
        dport: 25,
        want: TC_ACT_UNSPEC,
        reads: 3,
    },
    Probe {
        name: "v6 25 allow /64",
        prefix: Some("3fff:0:0:64::/64"),
        src: "3fff:0:0:64::25",
        dport: 25,
        want: TC_ACT_UNSPEC,
        reads: 7,
    },
    Probe {
        name: "v6 25 allow /128",
        prefix: Some("3fff:0:0:128::25/128"),
        src: "3fff:0:0:128::25",
        dport: 25,
        want: TC_ACT_UNSPEC,
        reads: 15,
    },
    Probe {
        name: "v6 25 deny",
        prefix: None,
        src: "3fff:0:0:128::26",
        dport: 25,
        want: TC_ACT_SHOT,
        reads: 15,
    },
];

/// An Ethernet frame holding a TCP SYN from `src` to `dport`.
fn packet(src: IpAddr, dport: u16) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    match src {
        IpAddr::V4(s) => {
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&[203, 0, 113, 25]);
            p.extend_from_slice(&ip);
        }
        IpAddr::V6(s) => {
            p.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&"2001:db8:ffff::25".parse::<Ipv6Addr>().unwrap().octets());
            p.extend_from_slice(&ip);
        }
    }
    p.extend_from_slice(&tcp);
    p
}

// ---------------------------------------------------------------------------
// The generator: deterministic, mixed families and lengths, clustered the way
// an operator's customers are. BENCHMARKS.md describes the distribution.

struct Rng(u64);

impl Rng {
    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Picks from (weight, value) pairs; weights are per 100 000.
    fn weighted(&mut self, table: &[(u64, (u8, u8))]) -> u8 {
        let mut r = self.below(100_000);
        for (w, (lo, hi)) in table {
            if r < *w {
                return lo + self.below(u64::from(hi - lo) + 1) as u8;
            }
            r -= w;
        }
        unreachable!("weights sum to 100 000")
    }
}

/// IPv4 prefix lengths, per 100 000 IPv4 entries: (weight, (min, max)),
/// uniform within a range.
const V4_LENGTHS: &[(u64, (u8, u8))] = &[
    (55_000, (32, 32)),
    (25_000, (24, 24)),
    (9_000, (25, 31)),
    (10_000, (17, 23)),
    (990, (16, 16)),
    (10, (8, 15)),
];
/// IPv6 prefix lengths, per 100 000 IPv6 entries.
const V6_LENGTHS: &[(u64, (u8, u8))] = &[
    (40_000, (128, 128)),
    (35_000, (64, 64)),
    (10_000, (56, 56)),
    (12_000, (48, 48)),
    (2_000, (33, 47)),
    (1_000, (32, 32)),
];
/// Share of IPv4 entries, per 100 000.
const V4_SHARE: u64 = 85_000;
/// Long prefixes (IPv4 /17 and longer, IPv6 /48 and longer) fall inside
/// "allocations": one IPv4 /16 per this many IPv4 entries, one IPv6 /32 per
/// this many IPv6 entries.
const V4_PER_ALLOCATION: usize = 500;
const V6_PER_ALLOCATION: usize = 2_000;
/// Sites (/48) per IPv6 allocation, /64 subnets per site that hold hosts.
const V6_SITES: u64 = 256;
const V6_HOST_SUBNETS: u64 = 16;

/// Unicast space to draw from: IPv4 1.0.0.0-223.255.255.255 minus 0/8, 10/8,
/// 127/8; IPv6 2000::/3. Reserved ranges are rejected afterwards.
fn random_v4(rng: &mut Rng) -> u32 {
    loop {
        let a = rng.next() as u32;
        let b0 = a >> 24;
        if (1..224).contains(&b0) && b0 != 10 && b0 != 127 {
            return a;
        }
    }
}

fn random_v6(rng: &mut Rng) -> u128 {
    let a = u128::from(rng.next()) << 64 | u128::from(rng.next());
    (a >> 3) | (1u128 << 125)
}

fn generate(n: usize, seed: u64) -> Vec<Prefix> {
    let mut rng = Rng(seed);
    let reserved: Vec<IpNet> = RESERVED.iter().map(|s| s.parse().unwrap()).collect();
    let v4_expected = n * V4_SHARE as usize / 100_000;
    let v4_allocs: Vec<u32> = (0..v4_expected.div_ceil(V4_PER_ALLOCATION).max(1))
        .map(|_| random_v4(&mut rng) & 0xffff_0000)
        .collect();
    let v6_allocs: Vec<u128> = (0..(n - v4_expected).div_ceil(V6_PER_ALLOCATION).max(1))
        .map(|_| random_v6(&mut rng) & !(u128::MAX >> 32))
        .collect();
    let mut out = HashSet::with_capacity(n);
    while out.len() < n {
        let net: IpNet = if rng.below(100_000) < V4_SHARE {
            let len = rng.weighted(V4_LENGTHS);
            let a = if len >= 17 {
                let base = v4_allocs[rng.below(v4_allocs.len() as u64) as usize];
                base | (rng.next() as u32 & 0xffff)
            } else {
                random_v4(&mut rng)
            };
            Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc().into()
        } else {
            let len = rng.weighted(V6_LENGTHS);
            let a = if len >= 48 {
                let alloc = v6_allocs[rng.below(v6_allocs.len() as u64) as usize];
                let site = alloc | u128::from(rng.below(V6_SITES)) << 80;
                if len == 128 {
                    // Hosts sit in a few /64s per site; half are numbered
                    // by hand (::1 to ::ffff), half have random interface IDs.
                    let subnet = site | u128::from(rng.below(V6_HOST_SUBNETS)) << 64;
                    let iid = if rng.next() & 1 == 0 {
                        1 + rng.below(0xffff)
                    } else {
                        rng.next()
                    };
                    subnet | u128::from(iid)
                } else {
                    site | u128::from(rng.next() as u16) << 64
                }
            } else {
                random_v6(&mut rng)
            };
            Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc().into()
        };
        let clashes = reserved
            .iter()
            .any(|r| r.contains(&net.network()) || net.contains(&r.network()));
        if !clashes {
            out.insert(net);
        }
    }
    out.into_iter()
        .map(|net| {
            net.to_string()
                .parse()
                .expect("generated prefixes are canonical")
        })
        .collect()
}

/// `n` prefixes: the probes' own prefixes plus generated ones.
fn allowlist(n: usize, seed: u64) -> Vec<Prefix> {
    let probes: Vec<Prefix> = PROBES
        .iter()
        .filter_map(|p| p.prefix)
        .map(|s| s.parse().unwrap())
        .collect();
    let mut list = generate(n.saturating_sub(probes.len()), seed);
    list.extend(probes);
    list.sort();
    list
}

// ---------------------------------------------------------------------------

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// One sample: the kernel's mean ns per run. (Wall-clock time around the
/// syscall would give sub-ns resolution, but on a shared 2-core VM it also
/// counts the time other processes ran; the kernel's timer stops for those.)
fn run(
    dp: &mut Datapath,
    prog: &'static str,
    pkt: &[u8],
    repeat: u32,
    want: i32,
    samples: &mut Vec<f64>,
) -> anyhow::Result<()> {
    let (ret, mean) = dp.test_run(prog, pkt, repeat)?;
    ensure!(ret == want, "{prog} returned {ret}, expected {want}");
    samples.push(mean.as_nanos() as f64);
    Ok(())
}

fn bench_size(n: usize, samples: usize, repeat: u32) -> anyhow::Result<()> {
    let prefixes = allowlist(n, SEED);
    let list = Allowlist::from_config(&prefixes);
    ensure!(
        list.len() == n,
        "generator gave {} prefixes, wanted {n}",
        list.len()
    );
    let (v4, v6) = list.count_by_family();
    let table = list.compile();
    for p in PROBES {
        let src: IpAddr = p.src.parse()?;
        let allowed = table.allows(src);
        if (p.dport == 25) && allowed != (p.want == TC_ACT_UNSPEC) {
            bail!("probe {} is mislabelled (allowed: {allowed})", p.name);
        }
    }
    // Only what is needed: the agent would ask for table_capacity(needed, 0),
    // room to double.
    let per_half = u32::try_from(table.len())?.max(smtpgate::config::MIN_TABLE_NODES);
    let pins = BenchPins::new();
    let mut dp = pins.load(per_half)?;
    dp.set_ports(&BTreeSet::from([25]))?;
    dp.set_action(Mode::Enforce, Action::Drop, Action::Drop)?;
    dp.install(&table)?;
    let kib = |nodes: usize| nodes as f64 * 1024.0 / (1024.0 * 1024.0);
    println!(
        "\n## {n} prefixes ({v4} IPv4, {v6} IPv6): table {} nodes = {:.1} MiB per half; \
         map {} nodes = {:.1} MiB; the agent's default sizing would map {:.1} MiB",
        table.len(),
        kib(table.len()),
        2 * per_half,
        kib(2 * per_half as usize),
        kib(2 * table_capacity(table.len(), 0) as usize),
    );

    let pkts: Vec<Vec<u8>> = PROBES
        .iter()
        .map(|p| packet(p.src.parse().unwrap(), p.dport))
        .collect();
    let mut base: Vec<Vec<f64>> = vec![Vec::with_capacity(samples); PROBES.len()];
    let mut cls: Vec<Vec<f64>> = vec![Vec::with_capacity(samples); PROBES.len()];
    // Warm up: loads both programs and faults the table in.
    for pkt in &pkts {
        dp.test_run(TC_BASELINE, pkt, repeat)?;
        dp.test_run(TC_INGRESS, pkt, repeat)?;
    }
    for round in 0..samples {
        for (i, p) in PROBES.iter().enumerate() {
            // Alternate which program goes first, so neither always runs
            // right after the other's cache footprint.
            if round % 2 == 0 {
                run(
                    &mut dp,
                    TC_BASELINE,
                    &pkts[i],
                    repeat,
                    TC_ACT_UNSPEC,
                    &mut base[i],
                )?;
                run(&mut dp, TC_INGRESS, &pkts[i], repeat, p.want, &mut cls[i])?;
            } else {
                run(&mut dp, TC_INGRESS, &pkts[i], repeat, p.want, &mut cls[i])?;
                run(
                    &mut dp,
                    TC_BASELINE,
                    &pkts[i],
                    repeat,
                    TC_ACT_UNSPEC,
                    &mut base[i],
                )?;
            }
        }
    }
    println!("| packet | node reads | baseline ns | classifier ns | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (i, p) in PROBES.iter().enumerate() {
        let b = median(&mut base[i]);
        let c = median(&mut cls[i]);
        println!(
            "| {} | {} | {b:.0} | {c:.0} | {:.2} |",
            p.name,
            p.reads,
            c / b
        );
    }
    Ok(())
}

/// Wholesale replacement of a 100k-entry allowlist: compile, then install.
fn bench_install(n: usize) -> anyhow::Result<()> {
    const RUNS: u64 = 7;
    let lists: Vec<Vec<Prefix>> = (0..RUNS + 2)
        .map(|i| allowlist(n, SEED ^ (i + 1)))
        .collect();
    let mut compiled = Vec::new();
    let mut compile_ms = Vec::new();
    let mut max_nodes = 0;
    for l in &lists {
        let list = Allowlist::from_config(l);
        let t = Instant::now();
        let table = list.compile();
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
        max_nodes = max_nodes.max(table.len());
        compiled.push(table);
    }
    let pins = BenchPins::new();
    let mut dp = pins.load(table_capacity(max_nodes, 0))?;
    let mut install_ms = Vec::new();
    for (i, table) in compiled.iter().enumerate() {
        // Stay clear of install()'s grace period between flips: an agent
        // does not replace its allowlist every few milliseconds.
        std::thread::sleep(Duration::from_millis(60));
        let t = Instant::now();
        dp.install(table)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // The first install into each half also faults its pages in.
        if i >= 2 {
            install_ms.push(ms);
        } else {
            println!("\ninstall #{i} (first touch of its half): {ms:.1} ms");
        }
    }
    println!(
        "{n}-entry allowlist, wholesale replacement, median of {RUNS}: \
         Allowlist::compile {:.1} ms, Datapath::install {:.1} ms ({max_nodes} nodes at most)",
        median(&mut compile_ms),
        median(&mut install_ms)
    );
    Ok(())
}

/// What destination exceptions cost a packet of a denied flow (an ACK, the
/// quick path), the only packets that ask them: without exceptions, with
/// 100 that do not cover the destination, and with one that does.
/// Allowlisted sources never reach the lookup.
fn bench_exceptions(samples: usize, repeat: u32) -> anyhow::Result<()> {
    use smtpgate::policy::{Exception, Exceptions};
    let list = Allowlist::from_config(&allowlist(1_000, SEED));
    let table = list.compile();
    let pins = BenchPins::new();
    let per_half = u32::try_from(table.len())?.max(smtpgate::config::MIN_TABLE_NODES);
    let mut dp = pins.load(per_half)?;
    dp.set_ports(&BTreeSet::from([25]))?;
    dp.set_action(Mode::Enforce, Action::Drop, Action::Drop)?;
    dp.install(&table)?;
    // A denied source: the benchmark's own probe for it.
    let denied = PROBES
        .iter()
        .find(|p| p.want == TC_ACT_SHOT && p.src.contains('.'))
        .context("no denied IPv4 probe")?;
    let src: IpAddr = denied.src.parse()?;
    let mut ack = packet(src, 25);
    // ACK instead of SYN: the packets of a flow after its first.
    let tcp_flags = 14 + 20 + 13;
    ack[tcp_flags] = 0x10;
    // 100 exceptions elsewhere in 198.51.100.0/24 and 192.0.2.0/24.
    let others: Vec<Exception> = (0..100u8)
        .map(|i| Exception {
            destinations: vec![
                format!(
                    "{}.{}.{}.{}",
                    if i < 50 { 198 } else { 192 },
                    if i < 50 { 51 } else { 0 },
                    if i < 50 { 100 } else { 2 },
                    i
                )
                .parse()
                .unwrap(),
            ],
            ports: BTreeSet::from([25]),
            comment: None,
        })
        .collect();
    let mut covering = others.clone();
    covering.push(Exception {
        destinations: vec!["203.0.113.25".parse()?],
        ports: BTreeSet::new(),
        comment: None,
    });
    let cases: [(&str, Vec<Exception>, i32); 3] = [
        ("no exceptions", Vec::new(), TC_ACT_SHOT),
        ("100 exceptions, destination not one", others, TC_ACT_SHOT),
        ("101 exceptions, destination one", covering, TC_ACT_UNSPEC),
    ];
    let mut base = vec![Vec::with_capacity(samples); cases.len()];
    let mut cls = vec![Vec::with_capacity(samples); cases.len()];
    for round in 0..samples {
        for (i, (_, ex, want)) in cases.iter().enumerate() {
            dp.set_exceptions(Exceptions::compile(ex)?.kernel_entries())?;
            if round == 0 {
                // Warm up this configuration.
                dp.test_run(TC_INGRESS, &ack, repeat)?;
            }
            run(
                &mut dp,
                TC_BASELINE,
                &ack,
                repeat,
                TC_ACT_UNSPEC,
                &mut base[i],
            )?;
            run(&mut dp, TC_INGRESS, &ack, repeat, *want, &mut cls[i])?;
        }
    }
    println!("\n## destination exceptions: an ACK of a denied flow (1 000-prefix allowlist)");
    println!("| case | baseline ns | classifier ns | over baseline ns |");
    println!("|---|---:|---:|---:|");
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let b = median(&mut base[i]);
        let c = median(&mut cls[i]);
        println!("| {name} | {b:.0} | {c:.0} | {:.0} |", c - b);
    }
    Ok(())
}
