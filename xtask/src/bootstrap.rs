//! `cargo xtask bootstrap`: installs what the build and the tests need, and
//! skips what is already right. Safe to run again and again.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages: the lab's tools and the real peers the tests talk to.
///
/// Installed with `--no-install-recommends`, so every Recommends a test
/// relies on is named here: swaks has no TLS without libnet-ssleay-perl and
/// no IPv6 without libio-socket-inet6-perl, and three tests failed on a new
/// machine because of it. [`check_capabilities`] proves they work.
const PACKAGES: &[&str] = &[
    "iproute2",      // ip netns, veth, bridges, tc
    "nftables",      // the lab's NAT and counters; the benchmark's baseline
    "bpftool",       // inspecting what is attached, by hand
    "python3-scapy", // crafted packets (VLAN stacks, fragments, header chains)
    "tcpdump",
    "swaks",                   // a real SMTP client...
    "libnet-ssleay-perl",      // ...with STARTTLS and implicit TLS (a Recommends)
    "libio-socket-inet6-perl", // ...and IPv6 (a Recommends)
    "postfix",                 // smtp-sink, smtp-source; a private one is a TLS MX
    "dnsmasq-base",            // lab DNS for the MX tests (no service, so no port 53)
    // The independent DKIM verifier (dkimpy) of agent/relay/tests/dkim.rs;
    // it Depends on python3-nacl (Ed25519) and python3-dnspython.
    "python3-dkim",
    "prometheus", // promtool and a real Prometheus server
    "sasl2-bin",
    "jq",
    "curl",       // the metrics tests scrape with it
    "util-linux", // setpriv, nsenter
    "kmod",       // modprobe tun
    // deploy/tests: the package, the sandbox and a systemd boot in a container
    "dpkg",
    "adduser",
    "systemd",
    "systemd-container", // systemd-nspawn
    "debootstrap",
    "python3-seccomp",
    // deploy/tests/container-test.sh: builds and runs the image (rootful,
    // host network, vfs storage: the rootless and overlay helpers podman
    // recommends are not used). runc: crun refuses hybrid cgroup trees.
    "podman",
    "runc",
];

/// Commands the tests call, each with the package that brings it.
const COMMANDS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    ("tcpdump", "tcpdump"),
    ("swaks", "swaks"),
    ("smtp-sink", "postfix"),
    ("smtp-source", "postfix"),
    ("postfix", "postfix"),
    ("dnsmasq", "dnsmasq-base"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("jq", "jq"),
    ("curl", "curl"),
    ("setpriv", "util-linux"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("dpkg-deb", "dpkg"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run() -> anyhow::Result<()> {
    apt()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    cargo_fuzz()?;
    check_capabilities()?;
    eprintln!("bootstrap: everything is in place");
    Ok(())
}

fn apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("bootstrap: Debian packages present");
        return Ok(());
    }
    eprintln!("bootstrap: installing {}", missing.join(" "));
    // Postfix is only here for its test tools: keep it unconfigured so it
    // never starts an MTA on this machine's port 25.
    sh(Command::new("sh").args([
        "-c",
        "echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections",
    ]))?;
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("bootstrap: nightly rust-src present");
        return Ok(());
    }
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker, linked against the nightly toolchain's own libLLVM (Debian's
/// LLVM is too old). It must be rebuilt when the nightly changes, which the
/// version check below notices: a stale binary fails to start.
fn bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            eprintln!("bootstrap: {}", v.trim());
            return Ok(());
        }
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("no nightly toolchain: it ships the LLVM bpf-linker links against")?;
    let sysroot = sysroot.trim();
    let lib = std::fs::read_dir(format!("{sysroot}/lib"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM-"))
                .map(str::to_owned)
        })
        .context("the nightly sysroot has no libLLVM-*.so")?;
    let llvm_major = lib
        .trim_start_matches("LLVM-")
        .split(['-', '.'])
        .next()
        .unwrap_or("22")
        .to_owned();
    eprintln!(
        "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against {lib} (about 2 minutes)"
    );
    sh(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major},no-llvm-linking"),
        ])
        .env(
            "RUSTFLAGS",
            format!("-L native={sysroot}/lib -l dylib={lib} -C link-arg=-Wl,-rpath,{sysroot}/lib"),
        ))
}

/// The BPF filesystem, where the agent pins what must outlive it.
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    eprintln!("bootstrap: mounting bpffs on /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// cargo-fuzz, for the relay's parser fuzz targets that CI runs briefly.
fn cargo_fuzz() -> anyhow::Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("bootstrap: installing cargo-fuzz");
    sh(Command::new("cargo").args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"]))
}

/// What the tests rely on, checked before any test starts: a missing piece
/// is named here, once, instead of surfacing as three unrelated test
/// failures later.
fn check_capabilities() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (cmd, pkg) in COMMANDS {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()));
        // Debian puts some of these in /usr/sbin, which a plain user's PATH
        // may lack; the tests run as root.
        let found = found
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(cmd).is_file());
        if !found {
            missing.push(format!("command {cmd} (package {pkg})"));
        }
    }
    let support = output(Command::new("swaks").arg("--support")).unwrap_or_default();
    for (feature, pkg) in [
        ("TLS", "libnet-ssleay-perl"),
        ("IPv6", "libio-socket-inet6-perl"),
    ] {
        if !support
            .lines()
            .any(|l| l == format!("=== {feature} supported"))
        {
            missing.push(format!("swaks {feature} support (package {pkg})"));
        }
    }
    // The lab's scripts run Debian's own Python, where python3-scapy lives.
    if output(Command::new("/usr/bin/python3").args(["-c", "import scapy.all"])).is_none() {
        missing.push("scapy for /usr/bin/python3 (package python3-scapy)".into());
    }
    // Ed25519 verification in dkimpy needs nacl; a dkimpy without it passes
    // RSA and fails every Ed25519 signature.
    if output(Command::new("/usr/bin/python3").args(["-c", "import dkim, nacl, dns.resolver"]))
        .is_none()
    {
        missing.push("dkimpy with nacl for /usr/bin/python3 (package python3-dkim)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        // The L3-device tests need tun; it is a module on most kernels.
        let _ = Command::new("modprobe").arg("tun").status();
        if !std::path::Path::new("/dev/net/tun").exists() {
            missing.push("/dev/net/tun (the tun module: modprobe tun)".into());
        }
    }
    if missing.is_empty() {
        eprintln!(
            "bootstrap: capabilities checked (swaks TLS and IPv6, scapy, dkimpy, tun, {} commands)",
            COMMANDS.len()
        );
        return Ok(());
    }
    bail!(
        "bootstrap: the tests need what is missing here:\n  {}",
        missing.join("\n  ")
    )
}
