//! A hive installed, upgraded and uninstalled over SSH: a real OpenSSH server (Debian's
//! `openssh-server`) on 127.0.0.1 with its own host key and one authorized key, and a
//! directory of the test's own as the "remote machine". The preflight refuses a closed
//! port, an unknown host key, a wrong key and a full disk without touching the machine.
//!
//! The machine here has no systemd, so the hive runs as a background daemon there; the
//! unit path of the same commands is covered by `systemd-analyze verify` in CI.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use rbee::actors::hive::store::{Entry, ModelId};
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, HiveView};
use rbee::actors::worker::api::{GenerateRequest, SamplingParams};
use rbee::actors::worker::engine::tiny::write_tiny_llama;

use common::daemons::{client, eventually, import, processes_under, read_all, start_queen};
use common::tmpfs::Tmpfs;

const SSHD: &str = "/usr/sbin/sshd";

/// An OpenSSH server on a free loopback port, killed when dropped.
struct Sshd {
    child: Child,
    port: u16,
    /// The key it accepts, one it does not, and its host key's line for known_hosts.
    key: PathBuf,
    wrong_key: PathBuf,
    known_host: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen {}", path.display());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sshd(dir: &Path) -> Sshd {
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: install Debian's openssh-server (.ci/run does)"
    );
    // Its privilege separation directory, which only the package's service would make.
    std::fs::create_dir_all("/run/sshd").unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (host_key, key, wrong_key) = (
        dir.join("host_key"),
        dir.join("client_key"),
        dir.join("wrong_key"),
    );
    for k in [&host_key, &key, &wrong_key] {
        keygen(k);
    }
    let authorized = dir.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &authorized).unwrap();
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
             AuthorizedKeysFile {}\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nUsePAM no\nLogLevel ERROR\n",
            host_key.display(),
            dir.join("sshd.pid").display(),
            authorized.display()
        ),
    )
    .unwrap();
    // Its log (every probe of the preflight's TCP check) in a file, not the test output.
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    let child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let public = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
    let mut words = public.split_whitespace();
    let known_host = format!(
        "[127.0.0.1]:{port} {} {}\n",
        words.next().unwrap(),
        words.next().unwrap()
    );
    Sshd {
        child,
        port,
        key,
        wrong_key,
        known_host,
    }
}

/// Kills whatever still runs from the machine's prefix when the test ends, passed or not.
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in processes_under(&self.0) {
            // SAFETY: a plain signal to a process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// How the test reaches the queen and the machine.
struct Operator {
    home: PathBuf,
    queen: String,
    credentials: PathBuf,
}

impl Operator {
    fn rbee(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args(args)
            .args(["--queen", &self.queen, "--credentials"])
            .arg(&self.credentials)
            .env("RBEE_HOME", &self.home)
            .env("RBEE_CONFIG", self.home.join("no-config.toml"))
            .output()
            .unwrap();
        eprintln!(
            "$ rbee {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256(path: &Path) -> String {
    rbee::actors::checksum::sha256_file(path, &mut |_| {}).unwrap()
}

async fn hive(client: &rbee::actors::queen::client::QueenClient, id: &str) -> Option<HiveView> {
    match client.call(ClientRequest::ListHives).await.unwrap() {
        ClientResponse::Hives(hives) => hives.into_iter().find(|h| h.id == id),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hive_is_installed_upgraded_and_uninstalled_over_ssh_after_a_preflight() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(&dir.path().join("sshd"));
    let (_queen, link) = start_queen(dir.path(), 0, &[]);
    let credentials = dir.path().join("operator");
    let made = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["queen", "credentials", "--data"])
        .arg(dir.path().join("queen"))
        .arg("--out")
        .arg(&credentials)
        .status()
        .unwrap();
    assert!(made.success());
    let operator = Operator {
        home: dir.path().to_path_buf(),
        queen: link.to_string(),
        credentials,
    };
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, &sshd.known_host).unwrap();
    let machine = dir.path().join("machine");
    let prefix = machine.join("opt/rbee");
    let _leftovers = Leftovers(prefix.clone());
    let port = sshd.port.to_string();
    let ssh_args = |key: &Path, known: &Path, prefix: &Path| -> Vec<String> {
        [
            "--ssh",
            "root@127.0.0.1",
            "--port",
            &port,
            "--identity-file",
            key.to_str().unwrap(),
            "--known-hosts",
            known.to_str().unwrap(),
            "--prefix",
            prefix.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let install = |extra: Vec<String>| {
        let mut args: Vec<String> = ["hive", "install", "--name", "far", "--data"]
            .map(String::from)
            .to_vec();
        args.push(dir.path().join("queen").to_str().unwrap().to_string());
        args.extend(extra);
        operator.rbee(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Each failed preflight says why and leaves the machine as it was.
    std::fs::create_dir_all(&machine).unwrap();
    let closed = free_port().to_string();
    let mut unreachable = ssh_args(&sshd.key, &known_hosts, &prefix);
    unreachable[3] = closed.clone();
    let out = install(unreachable);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach 127.0.0.1:"),
        "{}",
        text(&out)
    );

    let empty_known = dir.path().join("empty_known_hosts");
    std::fs::write(&empty_known, "").unwrap();
    let out = install(ssh_args(&sshd.key, &empty_known, &prefix));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not in the known-hosts file")
            && text(&out).contains("--accept-new-host-key"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&empty_known).unwrap(),
        "",
        "nothing pinned"
    );

    let out = install(ssh_args(&sshd.wrong_key, &known_hosts, &prefix));
    assert!(!out.status.success());
    assert!(text(&out).contains("refused the login"), "{}", text(&out));

    let full = machine.join("full");
    match Tmpfs::mount(&full, 1 << 20) {
        Ok(_tmpfs) => {
            let out = install(ssh_args(&sshd.key, &known_hosts, &full.join("rbee")));
            assert!(!out.status.success());
            assert!(
                text(&out).contains("the disk is too full"),
                "{}",
                text(&out)
            );
            assert_eq!(
                std::fs::read_dir(&full).unwrap().count(),
                0,
                "the full disk was written"
            );
        }
        Err(reason) => {
            eprintln!(
                "\n*** SKIPPING the full-disk preflight: cannot mount a tmpfs ({reason}) ***\n"
            )
        }
    }
    assert!(!prefix.exists(), "a failed preflight changed the machine");

    // The machine already holds a model in the store the hive will use.
    let model_file = dir.path().join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    import(&prefix.join("data"), &model_file, "tiny");

    // Install, pinning the host key on first sight.
    let mut first_sight = ssh_args(&sshd.key, &empty_known, &prefix);
    first_sight.push("--accept-new-host-key".into());
    let out = install(first_sight);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("joined the cluster"), "{}", text(&out));
    // Pinned (hashed, with Debian's HashKnownHosts).
    assert!(!std::fs::read_to_string(&empty_known).unwrap().is_empty());
    let installed = prefix.join("bin/rbee");
    assert_eq!(
        sha256(&installed),
        sha256(Path::new(env!("CARGO_BIN_EXE_rbee")))
    );
    let token_file = prefix.join("data/hive.env");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the join token is readable by others");

    let client = client(dir.path(), link).await;
    let tiny = ModelId::new("tiny").unwrap();
    let generate = || GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In the", 8)
    };
    let seen = read_all(
        client.generate(tiny.clone(), generate()).await.unwrap(),
        120,
    )
    .await;
    assert!(seen.done.is_some(), "{seen:?}");
    assert!(seen.assigned[0].starts_with("far/"), "{seen:?}");
    let first_answer = seen.tokens.clone();

    // A second install over it is refused and points at upgrade.
    let out = install(ssh_args(&sshd.key, &known_hosts, &prefix));
    assert!(!out.status.success());
    assert!(text(&out).contains("rbee hive upgrade"), "{}", text(&out));

    // Upgrade to another build (the same program with bytes appended, so it differs).
    let new_binary = dir.path().join("rbee-next");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_rbee")).unwrap();
    bytes.extend_from_slice(b"\0rbee-next\0");
    std::fs::write(&new_binary, bytes).unwrap();
    std::fs::set_permissions(&new_binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut upgrade: Vec<String> = ["hive", "upgrade", "--binary"].map(String::from).to_vec();
    upgrade.push(new_binary.to_str().unwrap().into());
    upgrade.extend(ssh_args(&sshd.key, &known_hosts, &prefix));
    let out = operator.rbee(&upgrade.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sha256(&installed), sha256(&new_binary));
    let view = hive(&client, "far").await.expect("the hive rejoined");
    assert!(
        view.models
            .iter()
            .any(|m| matches!(m, Entry::Ready(_)) && *m.id() == tiny),
        "the store lost its model: {view:?}"
    );
    let seen = read_all(
        client.generate(tiny.clone(), generate()).await.unwrap(),
        120,
    )
    .await;
    assert_eq!(seen.tokens, first_answer, "{seen:?}");

    let mut status: Vec<String> = ["hive", "status"].map(String::from).to_vec();
    status.extend(ssh_args(&sshd.key, &known_hosts, &prefix));
    let out = operator.rbee(&status.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("hive far running"), "{}", text(&out));

    // Uninstall: no process, binary or unit is left; the store stays until --purge.
    let mut uninstall: Vec<String> = ["hive", "uninstall"].map(String::from).to_vec();
    uninstall.extend(ssh_args(&sshd.key, &known_hosts, &prefix));
    let out = operator.rbee(&uninstall.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(!installed.exists() && !token_file.exists());
    assert!(!Path::new("/etc/systemd/system/rbee-hive.service").exists());
    eventually(10, "no process left under the prefix", || async {
        processes_under(&prefix).is_empty()
    })
    .await;
    assert!(
        prefix.join("data/models").exists(),
        "the store went without --purge"
    );

    // Installed again, the machine's kept identity rejoins as itself, without a token.
    let out = install(ssh_args(&sshd.key, &known_hosts, &prefix));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rejoins as itself"), "{}", text(&out));
    let seen = read_all(
        client.generate(tiny.clone(), generate()).await.unwrap(),
        120,
    )
    .await;
    assert_eq!(seen.tokens, first_answer, "{seen:?}");

    // --purge deletes only a directory that is rbee's.
    let stranger = machine.join("not-rbee");
    std::fs::create_dir_all(stranger.join("keep")).unwrap();
    let mut wrong: Vec<String> = ["hive", "uninstall", "--purge"].map(String::from).to_vec();
    wrong.extend(ssh_args(&sshd.key, &known_hosts, &stranger));
    let out = operator.rbee(&wrong.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !out.status.success() && text(&out).contains("not rbee's"),
        "{}",
        text(&out)
    );
    assert!(stranger.join("keep").exists());

    uninstall.push("--purge".into());
    let out = operator.rbee(&uninstall.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(!prefix.exists());
    assert!(
        hive(&client, "far").await.is_none(),
        "the purged hive is still registered"
    );
    eventually(10, "no process left under the prefix", || async {
        processes_under(&prefix).is_empty()
    })
    .await;
    // Its name is not given out again, and the refusal comes before any change.
    let out = install(ssh_args(&sshd.key, &known_hosts, &prefix));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("joined this cluster before"),
        "{}",
        text(&out)
    );
    assert!(!prefix.exists());
}
