//! The command line as an operator uses it: `patchbay channels list|show|enable|disable`
//! and `patchbay doctor` against a running service, and `patchbay config check` naming the
//! exact key that is wrong (and `serve` refusing the same config).

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use common::*;
use recorder::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(20);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The binary in `dir`, with no PATCHBAY* variables from the test's own environment.
fn patchbay(dir: &Path, envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("PATCHBAY") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `patchbay --config patchbay.toml config check` on `config` in a fresh directory.
fn config_check(config: &str, envs: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("patchbay.toml"), config).unwrap();
    patchbay(dir.path(), envs)
        .args(["--config", "patchbay.toml", "config", "check"])
        .output()
        .expect("run config check")
}

#[track_caller]
fn assert_rejected(what: &str, out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "{what}: config check accepted it; stdout: {}", stdout(out));
    let err = stderr(out);
    for n in needles {
        assert!(err.contains(n), "{what}: the message does not name {n:?}:\n{err}");
    }
    assert!(!stdout(out).contains("configuration ok"), "{what}: {}", stdout(out));
}

const ECHO: &str = "[assistants.echo]\nbackend = \"echo\"\n";

#[test]
fn config_check_names_the_wrong_key() {
    // A good config, with a secret from the environment and one from a file.
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "file-token-value\n").unwrap();
    let good = format!(
        "[server]\nbody_limit_bytes = 4096\n[pipeline]\nlease_secs = 10\n{ECHO}\
         [channels.x]\nkind = \"loopback\"\nassistant = \"echo\"\ntoken = \"env:PB_TEST_SET_TOKEN\"\n\
         [channels.y]\nkind = \"loopback\"\nassistant = \"echo\"\ndeliver_url = \"http://127.0.0.1:9/x\"\ntoken = \"file:{}\"\n",
        secret_file.path().display()
    );
    let out = config_check(&good, &[("PB_TEST_SET_TOKEN", "some-token-value")]);
    assert!(out.status.success(), "a good config: {}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("configuration ok"), "{}", stdout(&out));
    // The built-in defaults alone are fine too.
    let out = config_check("", &[]);
    assert!(out.status.success(), "an empty config: {}", stderr(&out));

    let channel = |extra: &str| format!("{ECHO}[channels.x]\nkind = \"loopback\"\nassistant = \"echo\"\n{extra}\n");
    /// What, the config, what the message must name, and the environment.
    type Case<'a> = (&'a str, String, Vec<&'a str>, &'a [(&'a str, &'a str)]);
    let cases: Vec<Case> = vec![
        ("unknown key in [pipeline]", "[pipeline]\nlease_sec = 3\n".into(), vec!["pipeline.lease_sec"], &[]),
        ("unknown section", "[servre]\nbind = \"127.0.0.1:1\"\n".into(), vec!["servre"], &[]),
        ("mistyped value", "[server]\nworkers = \"many\"\n".into(), vec!["server.workers"], &[]),
        ("value out of range", "[pipeline]\ndedupe_window_secs = 5\n".into(), vec!["pipeline.dedupe_window_secs"], &[]),
        ("bad bind address", "[server]\nbind = \"localhost\"\n".into(), vec!["server.bind"], &[]),
        ("unknown channel setting", channel("deliver_ur = \"http://127.0.0.1:9/x\""), vec!["channels.x.deliver_ur"], &[]),
        ("invalid channel setting", channel("deliver_url = \"ftp://x\""), vec!["channels.x.deliver_url", "http"], &[]),
        (
            "undeclared assistant",
            format!("{ECHO}[channels.x]\nkind = \"loopback\"\nassistant = \"ghost\"\n"),
            vec!["channels.x.assistant", "ghost"],
            &[],
        ),
        ("channel without kind", format!("{ECHO}[channels.x]\nassistant = \"echo\"\n"), vec!["channels.x.kind"], &[]),
        ("unknown kind", format!("{ECHO}[channels.x]\nkind = \"pigeon\"\nassistant = \"echo\"\n"), vec!["channels.x.kind", "pigeon"], &[]),
        ("bad channel id", format!("{ECHO}[channels.Bad_Name]\nkind = \"loopback\"\nassistant = \"echo\"\n"), vec!["channels.Bad_Name"], &[]),
        (
            "secret from an unset variable",
            channel("token = \"env:PB_TEST_SURELY_UNSET_VAR_7Q\""),
            vec!["channels.x.token", "PB_TEST_SURELY_UNSET_VAR_7Q"],
            &[],
        ),
        (
            "secret from a missing file",
            channel("token = \"file:/nonexistent/pb-test/token\""),
            vec!["channels.x.token", "/nonexistent/pb-test/token"],
            &[],
        ),
        (
            "assistant secret from an unset variable",
            "[assistants.w]\nbackend = \"webhook\"\nurl = \"http://127.0.0.1:9/bot\"\nsecret = \"env:PB_TEST_SURELY_UNSET_VAR_8R\"\n".into(),
            vec!["assistants.w.secret", "PB_TEST_SURELY_UNSET_VAR_8R"],
            &[],
        ),
        ("unknown assistant setting", format!("{ECHO}colour = \"red\"\n"), vec!["assistants.echo.colour"], &[]),
        ("unknown backend", "[assistants.a]\nbackend = \"oracle\"\n".into(), vec!["assistants.a.backend"], &[]),
        ("admin token from an unset variable", "[security]\nadmin_token = \"env:PB_TEST_SURELY_UNSET_VAR_9S\"\n".into(), vec!["security.admin_token", "PB_TEST_SURELY_UNSET_VAR_9S"], &[]),
        ("unknown environment variable", String::new(), vec!["PATCHBAY__SERVER__BINDD"], &[("PATCHBAY__SERVER__BINDD", "127.0.0.1:1")]),
        ("unknown environment section", String::new(), vec!["PATCHBAY__SERVRE__BIND"], &[("PATCHBAY__SERVRE__BIND", "127.0.0.1:1")]),
        ("TOML syntax error", "[server\nbind = 1\n".into(), vec!["patchbay.toml", "line 1"], &[]),
    ];
    for (what, config, needles, envs) in cases {
        let out = config_check(&config, envs);
        assert_rejected(what, &out, &needles);
    }

    // A known environment variable is fine and overrides the file.
    let out = config_check(&channel(""), &[("PATCHBAY__SERVER__WORKERS", "3"), ("PATCHBAY__CHANNELS__X__ENABLED", "false")]);
    assert!(out.status.success(), "{}", stderr(&out));
    // And an environment value for a channel is validated like the file's.
    let out = config_check(&channel(""), &[("PATCHBAY__CHANNELS__X__DELIVER_UR", "http://127.0.0.1:9/x")]);
    assert_rejected("an unknown channel setting from the environment", &out, &["channels.x.deliver_ur"]);

    // Every problem of the config is reported in one run.
    let two = format!(
        "{ECHO}[channels.a]\nkind = \"loopback\"\nassistant = \"echo\"\ndeliver_ur = \"x\"\n\
         [channels.b]\nkind = \"loopback\"\nassistant = \"ghost\"\n"
    );
    assert_rejected("two bad channels", &config_check(&two, &[]), &["channels.a.deliver_ur", "channels.b.assistant"]);

    // A missing --config file is named.
    let dir = tempfile::tempdir().unwrap();
    let out = patchbay(dir.path(), &[]).args(["--config", "absent.toml", "config", "check"]).output().unwrap();
    assert_rejected("a missing --config", &out, &["absent.toml"]);
}

#[test]
fn serve_refuses_a_config_that_check_refuses() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("patchbay.toml"),
        format!("{ECHO}[channels.x]\nkind = \"loopback\"\nassistant = \"echo\"\ndeliver_ur = \"http://127.0.0.1:9/x\"\n"),
    )
    .unwrap();
    let mut child = patchbay(dir.path(), &[])
        .args(["--config", "patchbay.toml", "serve", "--bind", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WITHIN;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running with a bad config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success());
    assert!(stderr(&out).contains("channels.x.deliver_ur"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("listening"), "{}", stdout(&out));
}

fn cli_config(deliver_url: &str) -> String {
    format!(
        r#"
{ECHO}
[channels.cfg]
kind = "loopback"
assistant = "echo"
enabled = true

[channels.delivering]
kind = "loopback"
assistant = "echo"
deliver_url = "{deliver_url}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_shows_and_toggles_channels() {
    let receiver = Fake::start().await;
    let pb = Patchbay::start(&cli_config(&receiver.url));
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(json!({"id": "from-api", "kind": "loopback", "assistant": "echo"}))).await;
    assert_eq!(s, 201, "{v}");
    let cfg_hook = pb.callback_url("cfg").await;
    let api_hook = pb.callback_url("from-api").await;

    // list: every channel with its callback URL and state.
    let out = pb.cli(&["channels", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = |id: &str| -> String {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("`channels list` has no line for {id}:\n{text}"))
            .to_owned()
    };
    let cfg_line = line("cfg");
    assert!(cfg_line.contains(&cfg_hook), "{cfg_line}");
    assert!(cfg_line.contains("loopback") && cfg_line.contains("echo"), "{cfg_line}");
    assert!(!cfg_line.contains("disabled"), "{cfg_line}");
    let api_line = line("from-api");
    assert!(api_line.contains(&api_hook) && api_line.contains("disabled"), "{api_line}");
    line("delivering");
    // --json is the API's answer.
    let out = pb.cli(&["channels", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("list --json is JSON");
    assert_eq!(v["channels"].as_array().unwrap().len(), 3, "{v}");

    // show: callback URL and state.
    let show = |id: &str| {
        let out = pb.cli(&["channels", "show", id]);
        assert!(out.status.success(), "show {id}: {}", stderr(&out));
        stdout(&out)
    };
    let field = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no `{name}:` line in:\n{text}"))
            .trim()
            .to_owned()
    };
    let s = show("cfg");
    assert_eq!(field(&s, "callback_url"), cfg_hook, "{s}");
    assert_eq!(field(&s, "enabled"), "true", "{s}");
    assert_ne!(field(&s, "state"), "disabled", "{s}");
    let s = show("from-api");
    assert_eq!(field(&s, "callback_url"), api_hook, "{s}");
    assert_eq!(field(&s, "state"), "disabled", "{s}");
    let s = show("delivering");
    assert!(s.contains(&receiver.url), "show lists the settings: {s}");

    // disable / enable change what the API reports and what the hook does.
    let out = pb.cli(&["channels", "disable", "cfg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cfg disabled"), "{}", stdout(&out));
    let (_, v) = pb.admin("GET", "/api/v1/channels/cfg", None).await;
    assert_eq!((&v["enabled"], &v["status"]["state"]), (&json!(false), &json!("disabled")), "{v}");
    assert_eq!(send(&cfg_hook, "a1", "c", "x").await.1["accepted"], false);
    assert_eq!(field(&show("cfg"), "state"), "disabled");
    assert!(line_of(&pb, "cfg").contains("disabled"));

    let out = pb.cli(&["channels", "enable", "from-api"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("from-api enabled"), "{}", stdout(&out));
    let (_, v) = pb.admin("GET", "/api/v1/channels/from-api", None).await;
    assert_eq!(v["enabled"], true, "{v}");
    assert_eq!(send(&api_hook, "a2", "c", "x").await.1["accepted"], true);

    // Through `delivering`: a disable/enable round trip ends with replies delivered.
    let d_hook = pb.callback_url("delivering").await;
    assert!(pb.cli(&["channels", "disable", "delivering"]).status.success());
    assert_eq!(send(&d_hook, "d1", "c", "while off").await.1["accepted"], false);
    assert!(pb.cli(&["channels", "enable", "delivering"]).status.success());
    assert_eq!(send(&d_hook, "d2", "c", "while on").await.1["accepted"], true);
    eventually(WITHIN, "the reply delivered after enable", || async {
        receiver.ok().iter().any(|r| r["reply"]["text"] == "echo: while on").then_some(())
    })
    .await;
    assert!(!receiver.ok().iter().any(|r| r["reply"]["text"] == "echo: while off"));

    // Errors: unknown channel, wrong token, nothing listening.
    for args in [&["channels", "show", "nope"][..], &["channels", "disable", "nope"], &["channels", "enable", "nope"]] {
        let out = pb.cli(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let e = stderr(&out);
        assert!(e.contains("404") && e.contains("nope"), "{args:?}: {e}");
    }
    let out = pb.cli(&["channels", "list", "--token", "definitely-not-the-admin-token"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    let out = pb.cli(&["channels", "disable", "from-api", "--token", "definitely-not-the-admin-token"]);
    assert!(!out.status.success());
    assert_eq!(pb.admin("GET", "/api/v1/channels/from-api", None).await.1["enabled"], true, "a refused disable changed nothing");

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = patchbay(pb.path(), &[("PATCHBAY_ADMIN_TOKEN", &pb.token)])
        .args(["--config", "patchbay.toml", "channels", "list", "--url", &closed])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
    receiver.stop().await;
}

/// The `channels list` line of `id`.
fn line_of(pb: &Patchbay, id: &str) -> String {
    let out = pb.cli(&["channels", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("no line for {id}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_disable_survives_a_restart() {
    let mut pb = Patchbay::start(&cli_config("http://127.0.0.1:9/unused"));
    let out = pb.cli(&["channels", "disable", "cfg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    pb.restart();
    let (_, v) = pb.admin("GET", "/api/v1/channels/cfg", None).await;
    assert_eq!(v["enabled"], false, "the config says enabled = true, the admin said no: {v}");
    assert!(line_of(&pb, "cfg").contains("disabled"));
    let hook = pb.callback_url("cfg").await;
    assert_eq!(send(&hook, "r1", "c", "x").await.1["accepted"], false);

    // And enabled again, it stays enabled.
    assert!(pb.cli(&["channels", "enable", "cfg"]).status.success());
    pb.restart();
    let (_, v) = pb.admin("GET", "/api/v1/channels/cfg", None).await;
    assert_eq!(v["enabled"], true, "{v}");
    let hook = pb.callback_url("cfg").await;
    assert_eq!(send(&hook, "r2", "c", "x").await.1["accepted"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_each_channel() {
    let receiver = Fake::start().await;
    // `cfg` keeps replies in memory (no deliver_url): nothing to check, so it is fine.
    let pb = Patchbay::start(&cli_config(&receiver.url));
    let out = pb.cli(&["doctor"]);
    assert!(out.status.success(), "doctor: {}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("cfg: ok"), "{text}");
    assert!(text.contains("delivering: ok"), "{text}");
    let out = pb.cli(&["doctor", "cfg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cfg: ok"));
    assert!(!stdout(&out).contains("delivering"), "one channel asked, one answered: {}", stdout(&out));

    // A channel whose deliver_url does not answer fails the doctor.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/deliver", l.local_addr().unwrap())
    };
    let (s, v) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "broken", "kind": "loopback", "assistant": "echo", "settings": {"deliver_url": closed}})))
        .await;
    assert_eq!(s, 201, "{v}");
    let out = pb.cli(&["doctor"]);
    assert!(!out.status.success(), "doctor passed with an unreachable deliver_url: {}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("broken: FAILED"), "{text}");
    assert!(text.contains("cfg: ok"), "{text}");
    assert!(!text.contains(&closed), "the doctor keeps URLs (which may carry tokens) out of its output: {text}");
    // Just the healthy one.
    assert!(pb.cli(&["doctor", "cfg"]).status.success());
    // An unknown channel.
    let out = pb.cli(&["doctor", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    receiver.stop().await;
}
