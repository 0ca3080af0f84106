//! `cargo xtask`: toolchain bootstrap, the lab, the test suite, benchmarks.

mod bootstrap;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::lab::{self, Host, Lab};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and Debian packages the build and the
    /// tests need (idempotent).
    Bootstrap,
    /// Bootstrap, build, and run the agent (extra arguments go to `smtpgate run`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build, and run every test, the privileged lab tests included.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the lab and keep it up until Ctrl-C, to try smtpgate by hand.
    Lab {
        /// Masquerade on the gateway's WAN side.
        #[arg(long)]
        nat: bool,
    },
    /// Run a benchmark (as root): `datapath` is the classifier's per-packet
    /// cost against a pass-through program (see BENCHMARKS.md).
    Bench { what: String },
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap::run(),
        Cmd::Run { args } => {
            bootstrap::run()?;
            status(cargo().args(["build", "--release", "-p", "smtpgate"]))?;
            let bin = workspace_root().join("target/release/smtpgate");
            let err = exec(Command::new(bin).arg("run").args(args));
            Err(err.into())
        }
        Cmd::Test { args } => {
            bootstrap::run()?;
            status(cargo().args(["build", "-p", "smtpgate"]))?;
            // The default members: the eBPF crate only builds for bpfel
            // (agent/build.rs builds it), so not `--workspace`.
            let tests = status(cargo().args(["test", "--no-fail-fast"]).args(&args));
            // A filtered run is someone chasing one test: skip the rest.
            if args.is_empty() {
                tests?;
                // The relay without its default legacy-hashes feature: the
                // unit tests check that such hashes are then refused with
                // the reason (and that everything else still works).
                status(cargo().args([
                    "test",
                    "-p",
                    "smtpgate-relay",
                    "--no-default-features",
                    "--lib",
                ]))?;
                fuzz_briefly()?;
                deploy_tests()?;
                return Ok(());
            }
            tests
        }
        Cmd::Lab { nat } => lab_session(nat),
        Cmd::Bench { what } => match what.as_str() {
            "datapath" => {
                bootstrap::run()?;
                status(cargo().args(["bench", "-p", "smtpgate", "--bench", "datapath"]))
            }
            "relay" => {
                bootstrap::run()?;
                bench_relay()
            }
            other => bail!("unknown benchmark {other:?}; known: datapath, relay"),
        },
    }
}

/// Each relay fuzz target for a short while: long enough to catch a
/// regression in the parsers, short enough for every CI run.
fn fuzz_briefly() -> anyhow::Result<()> {
    let dir = workspace_root().join("agent/relay/fuzz");
    for target in ["command", "data"] {
        status(Command::new("cargo").current_dir(&dir).args([
            "+nightly",
            "fuzz",
            "run",
            target,
            "--",
            "-max_total_time=20",
        ]))?;
    }
    Ok(())
}

/// deploy/: the Debian package (built, installed with dpkg, checked,
/// purged), the systemd unit, the Kubernetes manifests and chart.
fn deploy_tests() -> anyhow::Result<()> {
    status(Command::new("bash").arg(workspace_root().join("deploy/tests/run-all.sh")))
}

/// The relay under load: STARTTLS, AUTH, durable spool and delivery to a
/// local smtp-sink, per message.
fn bench_relay() -> anyhow::Result<()> {
    for size in [1024, 100 * 1024] {
        for sessions in [1, 10, 100] {
            let messages = (400 / sessions).max(5).to_string();
            println!("== {sessions} sessions, {size}-byte messages");
            status(
                cargo()
                    .args([
                        "run",
                        "--release",
                        "-q",
                        "-p",
                        "smtpgate-relay",
                        "--example",
                        "loadgen",
                        "--",
                    ])
                    .args([
                        "--sessions",
                        &sessions.to_string(),
                        "--messages",
                        &messages,
                        "--size",
                        &size.to_string(),
                    ]),
            )?;
        }
    }
    Ok(())
}

fn exec(cmd: &mut Command) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    cmd.exec()
}

fn lab_session(nat: bool) -> anyhow::Result<()> {
    let mut lab = Lab::up("try", lab::Options { nat })?;
    lab.start_listeners()?;
    let ns = |h| lab.ns(h);
    println!(
        "Lab {} is up ({}). In another shell:\n\
         \n  # the gateway: run smtpgate on its client-facing interface\n\
         \n  cat > /tmp/lab.toml <<'EOF'\nallowlist = [\"{}\", \"{}\"]\n[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\nEOF\
         \n  cargo build --release -p smtpgate\
         \n  nsenter --net=/run/netns/{} target/release/smtpgate run --config /tmp/lab.toml\n\
         \n  # (nsenter, not `ip netns exec`: that mounts a /sys of its own, without the\
         \n  # bpffs the agent pins into.) Then, from any shell on this host:\
         \n  target/release/smtpgate status\n\
         \n  # an allowlisted and a denied client, to the internet host's port 25\n\
         \n  ip netns exec {} swaks --server {} --from a@client.lab --to b@inet.lab --local-interface {}\
         \n  ip netns exec {} swaks --server {} --from a@client.lab --to b@inet.lab --local-interface {}\n\
         \n  Namespaces: {}, {}, {}, {}.\n  Ctrl-C tears the lab down.",
        lab.prefix,
        if nat { "NAT gateway" } else { "routed gateway" },
        lab::CLIENT_ALLOWED_V4,
        lab::CLIENT_ALLOWED_V6,
        ns(Host::Gw),
        ns(Host::Client),
        lab::INET_V4,
        lab::CLIENT_ALLOWED_V4,
        ns(Host::Client),
        lab::INET_V4,
        lab::CLIENT_DENIED_V4,
        ns(Host::Client),
        ns(Host::VlanClient),
        ns(Host::Gw),
        ns(Host::Inet),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_channel(tx);
    let _ = rx.recv();
    println!("tearing down {}", lab.prefix);
    Ok(())
}

/// Blocks SIGINT/SIGTERM and turns them into a message, so the lab's Drop
/// still runs.
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) {
    // SAFETY: building and applying a signal mask for this thread before
    // any other thread exists, then waiting for those signals on one thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            let _ = tx.send(());
        });
    }
}
