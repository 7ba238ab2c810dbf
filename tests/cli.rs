//! The `rbee` command line as a user runs it, with real processes on 127.0.0.1 and
//! temporary homes: a queen and a hive in the background, a tiny model imported, a run
//! against the queen, `ps`, `stop`, and nothing left running afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rbee::actors::worker::engine::tiny::write_tiny_llama;

/// `rbee queen start` on ports of its own.
const QUEEN_START: &[&str] = &[
    "queen",
    "start",
    "--listen",
    "127.0.0.1:0",
    "--join-listen",
    "127.0.0.1:0",
    "--http",
    "127.0.0.1:0",
];

/// `rbee ARGS` with its data in `home` (and HOME, the config file inside it too).
fn rbee(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(args)
        .env("RBEE_HOME", home)
        .env("HOME", home)
        .env("RBEE_CONFIG", home.join("config.toml"))
        .env_remove("RBEE_QUEEN")
        .env_remove("RBEE_CREDENTIALS")
        .output()
        .expect("rbee runs")
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = rbee(home, args);
    assert!(
        out.status.success(),
        "rbee {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(home: &Path, args: &[&str]) -> serde_json::Value {
    let text = ok(home, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("rbee {args:?}: {e}: {text}"))
}

/// Stops the daemons started from these homes (`queen` or `hive`) when a test ends, passed
/// or failed: a failed assertion must not leave a queen, a hive or its workers running.
/// Declared after the temporary directory, so it runs before the directory goes.
struct StopDaemons(Vec<(PathBuf, &'static str)>);

impl Drop for StopDaemons {
    fn drop(&mut self) {
        for (home, role) in self.0.iter().rev() {
            let _ = rbee(home, &[role, "stop"]);
        }
    }
}

/// Whether `pid` runs (a zombie counts as gone: it waits only for its parent to reap it).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn wait_gone(pid: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cluster_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (queen_home, hive_home) = (dir.path().join("q"), dir.path().join("h"));
    let _stop = StopDaemons(vec![
        (queen_home.clone(), "queen"),
        (hive_home.clone(), "hive"),
    ]);
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, 512).unwrap();

    ok(&queen_home, QUEEN_START);
    let status = json(&queen_home, &["queen", "status", "--json"]);
    assert_eq!(status["running"], true, "{status}");
    let queen_pid = status["pid"].as_u64().unwrap();
    let token = ok(&queen_home, &["queen", "token"]);
    // The hive's hub is a closed port on loopback: pulls from it fail at once.
    let started = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["hive", "start", "--join", token.trim(), "--name", "hive-a"])
        .env("RBEE_HOME", &hive_home)
        .env("HOME", &hive_home)
        .env("RBEE_CONFIG", hive_home.join("config.toml"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    let hive_pid = json(&hive_home, &["hive", "status", "--json"])["pid"]
        .as_u64()
        .unwrap();

    // The commands below find the queen that runs on this machine (its data directory).
    let imported = ok(
        &queen_home,
        &["import", model.to_str().unwrap(), "--id", "tiny"],
    );
    assert!(imported.contains("imported tiny"), "{imported}");
    // A failed pull says why in plain lines when its output is not a terminal, and in
    // JSON lines with --json; it leaves no catalog entry.
    let pulled = rbee(&queen_home, &["pull", "hf:org/missing", "--id", "missing"]);
    let said = String::from_utf8_lossy(&pulled.stderr);
    assert_eq!(pulled.status.code(), Some(1), "{said}");
    assert!(said.contains("hive-a: failed: "), "{said}");
    let pulled = rbee(
        &queen_home,
        &["pull", "hf:org/missing", "--id", "missing", "--json"],
    );
    let last = String::from_utf8_lossy(&pulled.stdout)
        .lines()
        .last()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    assert!(
        last.as_ref()
            .is_some_and(|l| l["hive"] == "hive-a" && l["failed"].is_string()),
        "{last:?}"
    );
    let models = json(&queen_home, &["models", "--json"]);
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    let models = json(&queen_home, &["models", "--json"]);
    assert_eq!(models[0]["hive"], "hive-a", "{models}");
    let hives = json(&queen_home, &["hives", "--json"]);
    assert_eq!(hives.as_array().unwrap().len(), 1, "{hives}");

    let answer = ok(
        &queen_home,
        &[
            "run",
            "--model",
            "tiny",
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "In the",
        ],
    );
    assert!(!answer.trim().is_empty());
    let workers = json(&queen_home, &["ps", "--json"]);
    let worker = &workers[0];
    assert_eq!(worker["key"], "hive-a/tiny-1", "{workers}");
    let worker_pid = worker["info"]["pid"].as_u64().unwrap();
    assert!(alive(worker_pid));
    // The queen's default idle timeout, and the idle time since the answer ended.
    assert_eq!(
        worker["info"]["idle_timeout"],
        serde_json::json!({"After": {"secs": 300, "nanos": 0}}),
        "{workers}"
    );
    assert!(worker["idle_secs"].as_u64().unwrap() < 300, "{workers}");
    let table = ok(&queen_home, &["ps"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let stop = row[row.len().saturating_sub(2)..].join(" ");
    assert!(
        table.starts_with("WORKER") && table.contains("IDLE STOP"),
        "{table}"
    );
    assert!(stop == "in 5m00s" || stop.starts_with("in 4m"), "{table}");
    let status = json(&queen_home, &["status", "--json"]);
    assert_eq!(status["workers"].as_array().unwrap().len(), 1, "{status}");

    ok(&queen_home, &["stop", "tiny"]);
    wait_gone(worker_pid);
    assert_eq!(json(&queen_home, &["ps", "--json"]), serde_json::json!([]));

    ok(&hive_home, &["hive", "stop"]);
    ok(&queen_home, &["queen", "stop"]);
    wait_gone(hive_pid);
    wait_gone(queen_pid);
    let stopped = rbee(&queen_home, &["queen", "status"]);
    assert_eq!(stopped.status.code(), Some(3));
    let none = rbee(&queen_home, &["ps"]);
    assert_eq!(none.status.code(), Some(3), "no queen: unreachable");
}

#[test]
fn run_on_a_cluster_pulls_a_card_that_no_hive_has_then_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (queen_home, hive_home) = (dir.path().join("q"), dir.path().join("h"));
    let _stop = StopDaemons(vec![
        (queen_home.clone(), "queen"),
        (hive_home.clone(), "hive"),
    ]);
    ok(&queen_home, QUEEN_START);
    let token = ok(&queen_home, &["queen", "token"]);
    // The hive's package cache is the shared one, where `rbee pull` (CI runs it first)
    // left SmolLM2's package: the pull checks it instead of downloading. Its hub is a
    // closed port, so the card falls through to the package at once.
    let started = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["hive", "start", "--join", token.trim(), "--name", "hive-a"])
        .env("RBEE_HOME", &hive_home)
        .env("RBEE_CACHE", rbee::actors::paths::cache_dir())
        .env("RBEE_CONFIG", hive_home.join("config.toml"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    assert_eq!(
        json(&queen_home, &["models", "--json"]),
        serde_json::json!([])
    );

    let ask = [
        "run",
        "--model",
        "smollm2-135m",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "The capital of France is",
    ];
    let first = rbee(&queen_home, &ask);
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{said}");
    assert!(said.contains("no hive has smollm2-135m; pulling"), "{said}");
    assert!(said.contains("hive-a"), "no progress of the hive: {said}");
    assert!(!String::from_utf8_lossy(&first.stdout).trim().is_empty());
    let models = json(&queen_home, &["models", "--json"]);
    assert_eq!(models[0]["hive"], "hive-a", "{models}");
    // Now a hive has it: no second pull.
    let second = rbee(&queen_home, &ask);
    assert!(second.status.success());
    assert!(!String::from_utf8_lossy(&second.stderr).contains("pulling"));
}

#[test]
fn with_no_queen_models_show_verify_and_rm_work_on_this_machines_store() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let file = home.join("tiny.gguf");
    write_tiny_llama(&file, 64).unwrap();
    ok(home, &["import", file.to_str().unwrap(), "--id", "tiny"]);
    let models = json(home, &["models", "--json"]);
    let models = models.as_array().unwrap();
    assert_eq!(models.len(), 1, "{models:?}");
    assert_eq!(models[0]["hive"], "(this machine)");
    assert_eq!(models[0]["entry"]["Ready"]["id"], "tiny", "{models:?}");
    let table = ok(home, &["models"]);
    assert!(table.lines().any(|l| l.starts_with("tiny ")), "{table}");
    let shown = json(home, &["show", "tiny", "--json"]);
    assert_eq!(shown["summary"]["architecture"], "llama", "{shown}");
    assert!(ok(home, &["verify", "tiny"]).contains("match their sha256"));
    assert!(
        !rbee(home, &["show", "tiny", "--hive", "h"])
            .status
            .success()
    );
    assert!(ok(home, &["rm", "tiny"]).contains("removed tiny"));
    assert_eq!(json(home, &["models", "--json"]), serde_json::json!([]));
    assert!(!rbee(home, &["show", "tiny"]).status.success());
}

#[test]
fn a_wrong_queen_address_fails_fast_with_its_own_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let _stop = StopDaemons(vec![(home.to_path_buf(), "queen")]);
    ok(home, QUEEN_START);
    let credentials = home.join("credentials");
    ok(
        home,
        &[
            "queen",
            "credentials",
            "--out",
            credentials.to_str().unwrap(),
        ],
    );
    ok(home, &["queen", "stop"]);
    // Nothing listens on the queen's old port any more.
    let started = Instant::now();
    let out = rbee(
        home,
        &[
            "ps",
            "--queen",
            "127.0.0.1:9",
            "--credentials",
            credentials.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
    // A hang check, not a measurement: the connect timeout is 3 s.
    assert!(started.elapsed() < Duration::from_secs(20));
    let usage = rbee(home, &["ps", "--no-such-flag"]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn the_http_api_is_not_served_beyond_loopback_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let _stop = StopDaemons(vec![(home.to_path_buf(), "queen")]);
    let mut open = QUEEN_START.to_vec();
    open.pop();
    open.push("0.0.0.0:0");
    let refused = rbee(home, &open);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no API key"), "{stderr}");

    // A key admits; a second start is refused while the queen runs (on loopback: no test
    // listens beyond it).
    ok(home, &["queen", "keys", "create", "--name", "ops"]);
    ok(home, QUEEN_START);
    let again = rbee(home, QUEEN_START);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));
    let listed = json(home, &["queen", "keys", "list", "--json"]);
    assert_eq!(listed[0]["name"], "ops", "{listed}");
    ok(home, &["queen", "stop"]);
}

#[test]
fn service_units_pass_systemd_analyze_and_keep_the_join_token_out_of_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (home, units) = (dir.path().join("home"), dir.path().join("units"));
    let unit_dir = format!("--unit-dir={}", units.display());
    let queen_data = dir.path().join("queen-data");
    ok(
        &home,
        &[
            "queen",
            "install-service",
            "--listen",
            "0.0.0.0:7700",
            "--data",
            queen_data.to_str().unwrap(),
            &unit_dir,
        ],
    );
    // A readable file left there before is replaced, not refilled with the token.
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("hive.env"), "OLD=1\n").unwrap();
    ok(
        &home,
        &[
            "hive",
            "install-service",
            "--join",
            "SECRET-TOKEN",
            "--name",
            "gpu-1",
            &unit_dir,
        ],
    );
    let queen = std::fs::read_to_string(units.join("rbee-queen.service")).unwrap();
    let hive = std::fs::read_to_string(units.join("rbee-hive.service")).unwrap();
    assert!(queen.contains(r#""queen" "serve" "--listen" "0.0.0.0:7700" "--data""#));
    assert!(
        queen.contains(&format!(" {}\n", queen_data.display())),
        "{queen}"
    );
    assert!(!queen.contains("unit-dir") && !hive.contains("unit-dir"));
    assert!(
        hive.contains(r#""hive" "serve" "--name" "gpu-1""#),
        "{hive}"
    );
    assert!(
        !hive.contains("SECRET-TOKEN"),
        "the token is not in the unit"
    );
    let env = home.join("hive.env");
    assert_eq!(
        std::fs::read_to_string(&env).unwrap(),
        "RBEE_JOIN_TOKEN=SECRET-TOKEN\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only its owner reads the token");
    // systemd's own check of both units (`.ci/run` installs systemd where it is absent).
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("rbee-queen.service"))
        .arg(units.join("rbee-hive.service"))
        .output()
        .expect("systemd-analyze runs (Debian package systemd)");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
