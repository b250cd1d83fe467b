//! The control socket under hostile clients, on real KVM (native or nested): a client
//! of another uid is refused (by the socket's permissions, and by lpvmm itself when
//! those are opened up), malformed, oversized and never-ending lines get an error or are
//! held harmlessly, 100 clients at once are all answered, and a client killed in the
//! middle of a transition changes nothing about it. After each abuse the VM is
//! untouched: its kernel text, patch area and patch state read as before, and its guest
//! answers. The clients are `ctl-probe` (tests/src/bin/ctl-probe.rs).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lpvmm::proto::OutcomeView;
use lpvmm_tests::patchtest::{
    build_lpvmm, checksums, cmdline, ended, held_by, kill, kp_build, patch_path, sleeper, status,
};
use lpvmm_tests::{
    check, host_files_or_exit, host_trial, repo_root, run_group, Guest, TestHost, TestResult,
};

const PATCHED: &str = "this has been live patched";
const PROBE: &str = "/usr/bin/ctl-probe";

/// Where the VM's control socket is, as `lpvmm run` announced it on its stderr.
fn socket_of(g: &mut Guest) -> Result<String, String> {
    let err = g.vmm_stderr();
    err.lines()
        .find_map(|l| l.split("control socket ").nth(1))
        .map(|p| p.trim().to_string())
        .filter(|p| p.ends_with(".sock"))
        .ok_or_else(|| format!("lpvmm run did not announce its control socket:\n{err}"))
}

/// `ctl-probe ARGS` on the test host; returns its output (it must exit 0).
fn probe(g: &mut Guest, args: &str) -> Result<String, String> {
    let probe = g.host.file(PROBE);
    g.host.exec(&format!("{probe} {args}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What must not change under abuse: kernel text, patch area, patches and their states.
#[derive(Debug, PartialEq)]
struct VmView {
    text: String,
    area: String,
    patches: String,
}

fn view(g: &mut Guest) -> Result<VmView, String> {
    let (text, area) = checksums(g)?;
    let patches = format!("{:?}", status(g)?.patches);
    Ok(VmView {
        text,
        area,
        patches,
    })
}

/// The VM reads as before and its guest answers.
fn untouched(g: &mut Guest, before: &VmView, after_what: &str) -> TestResult {
    let now = view(g)?;
    check!(
        &now == before,
        "after {after_what} the VM changed: {now:?}, was {before:?}"
    );
    let alive = g.run("echo alive")?;
    check!(
        alive.trim() == "alive",
        "after {after_what} the guest does not answer: {alive:?}"
    );
    Ok(())
}

/// Lines that are not requests: each gets a bad-request error on the same connection,
/// which then still answers a good request.
fn malformed_lines(g: &mut Guest, sock: &str) -> TestResult {
    let bad: [&[u8]; 6] = [
        b"not json",
        b"{}",
        b"{\"v\":1,\"op\":\"no_such_op\"}",
        b"{\"v\":999,\"op\":\"status\"}",
        b"{\"v\":1,\"op\":\"read_phys\",\"addr\":-1,\"len\":99999999999}",
        b"\x00\xff\xfe{\"v\":1",
    ];
    let mut args: Vec<String> = bad.iter().map(|l| hex(l)).collect();
    args.push(hex(b"{\"v\":1,\"op\":\"status\"}"));
    let out = probe(g, &format!("send {sock} {}", args.join(" ")))?;
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    check!(
        lines.len() == bad.len() + 1,
        "one response per line expected, got:\n{out}"
    );
    for (line, resp) in bad.iter().zip(&lines) {
        check!(
            resp.contains("\"ok\":false") && resp.contains("bad_request"),
            "{:?} answered {resp}",
            String::from_utf8_lossy(line)
        );
    }
    check!(
        lines[bad.len()].contains("\"ok\":true"),
        "after the bad lines a status request was not answered: {}",
        lines[bad.len()]
    );
    Ok(())
}

/// A line that never ends: streamed as fast as lpvmm reads, it is cut off at the
/// request limit with an error; dribbled slowly, it is held without harm while other
/// clients are answered.
fn endless_lines(g: &mut Guest, sock: &str) -> TestResult {
    let out = probe(g, &format!("flood {sock}"))?;
    let wrote: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("wrote="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("flood printed no count:\n{out}"))?;
    check!(
        out.contains("request longer than") && out.contains("bad_request"),
        "a never-ending line got no error:\n{out}"
    );
    let limit = lpvmm::proto::MAX_REQUEST_BYTES as u64;
    check!(
        wrote >= limit && wrote < limit + (16 << 20),
        "lpvmm cut a never-ending line off after {wrote} bytes, not near its limit {limit}"
    );

    let probe_path = g.host.file(PROBE);
    let tmp = g.host.tmp();
    g.host.exec(&format!(
        "{probe_path} dribble {sock} 12 >{tmp}/dribble.out 2>&1 &"
    ))?;
    // Each status must come back within STATUS_BOUND: a correctness bound (the dribbler
    // must not hold lpvmm's other clients up), not a benchmark; generous because each
    // status runs `lpvmm` through the nested test host's console, which takes well under
    // a second when all is well.
    const STATUS_BOUND: Duration = Duration::from_secs(10);
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while t0.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let (rc, out) = g.lpvmm("status {vm}")?;
        let took = t.elapsed();
        check!(rc == 0, "status while a line dribbles in: {out}");
        check!(
            took < STATUS_BOUND,
            "status took {took:?} while a line dribbled in (bound {STATUS_BOUND:?}): {out}"
        );
        slowest = slowest.max(took);
        answered += 1;
    }
    let (_, done) = g.host.exec_status(
        &format!("sleep 6; cat {tmp}/dribble.out"),
        Duration::from_secs(60),
    )?;
    check!(done.contains("still-open"), "the dribbling client: {done}");
    eprintln!("{answered} status answered, each within {slowest:?}, while a line dribbled in");
    Ok(())
}

/// Another uid: the socket's mode (0600, in a 0700 directory) keeps it out; with those
/// opened up, lpvmm's own check of the peer's credentials closes the connection unheard.
fn other_uid(g: &mut Guest, sock: &str) -> TestResult {
    let (_, id) = g.host.exec_status("id -u", Duration::from_secs(30))?;
    check!(
        id.trim() == "0",
        "the other-uid check needs root on the test host (id -u: {id})"
    );
    let out = probe(g, &format!("as-uid 65534 {sock}"))?;
    check!(
        out.contains("connect-error") && out.contains("ermission denied"),
        "uid 65534 reached the socket: {out}"
    );
    let dir = sock.rsplit_once('/').map(|x| x.0).unwrap_or(".");
    g.host
        .exec(&format!("chmod 0777 {dir}; chmod 0666 {sock}"))?;
    let opened = probe(g, &format!("as-uid 65534 {sock}"));
    g.host
        .exec(&format!("chmod 0700 {dir}; chmod 0600 {sock}"))?;
    let out = opened?;
    check!(
        out.trim() == "CLOSED",
        "with the socket open to all, uid 65534 was not refused by lpvmm: {out}"
    );
    Ok(())
}

fn many_clients(g: &mut Guest, sock: &str) -> TestResult {
    let out = probe(g, &format!("many {sock} 100"))?;
    check!(
        out.contains("answered=100 of 100"),
        "100 concurrent clients: {out}"
    );
    Ok(())
}

/// A client abused the socket in every way above; the VM is as it was.
fn hostile_clients(host: &mut TestHost) -> TestResult {
    let (mut g, _) = host.boot_guest("ctl-abuse", "6.1", 2, "")?;
    let sock = socket_of(&mut g)?;
    let before = view(&mut g)?;
    malformed_lines(&mut g, &sock)?;
    untouched(&mut g, &before, "malformed lines")?;
    endless_lines(&mut g, &sock)?;
    untouched(&mut g, &before, "never-ending lines")?;
    other_uid(&mut g, &sock)?;
    untouched(&mut g, &before, "another uid")?;
    many_clients(&mut g, &sock)?;
    untouched(&mut g, &before, "100 concurrent clients")?;
    g.poweroff().map(|_| ())
}

/// `lpvmm patch` killed while it waits on a per-task transition held by a sleeper: the
/// transition goes on exactly as before (same blocker, same progress) and completes
/// when the sleeper goes.
fn client_killed_mid_transition(host: &mut TestHost) -> TestResult {
    let (mut g, _) = host.boot_guest("ctl-kill", "6.1", 2, "")?;
    let (pid, _) = sleeper(&mut g, 1000, "common_nsleep")?;
    let file = g.host.file(&patch_path("nsleep-cmdline"));
    let tmp = g.host.tmp();
    let lpvmm = g.host.lpvmm();
    g.host.exec(&format!(
        "{lpvmm} patch ctl-kill {file} >{tmp}/waiting.out 2>&1 & echo $! >{tmp}/waiting.pid"
    ))?;
    let before = held_by(&mut g, pid)?;
    let (_, alive) = g.host.exec_status(
        &format!("kill -0 $(cat {tmp}/waiting.pid) && echo waiting"),
        Duration::from_secs(30),
    )?;
    check!(
        alive.contains("waiting"),
        "lpvmm patch did not wait for the transition: {alive}"
    );
    g.host.exec(&format!(
        "kill -9 $(cat {tmp}/waiting.pid); sleep 2; cat {tmp}/waiting.out"
    ))?;
    let after = held_by(&mut g, pid)?;
    check!(
        after.id == before.id && after.moved == before.moved && after.pending == before.pending,
        "killing the client changed the transition: {after:?}, was {before:?}"
    );
    check!(
        cmdline(&mut g)? == PATCHED,
        "a new process during the transition does not see the patch"
    );
    kill(&mut g, pid)?;
    let done = ended(&mut g, before.id)?;
    check!(done.outcome == OutcomeView::Done, "outcome {done:?}");
    check!(
        cmdline(&mut g)? == PATCHED,
        "after the transition /proc/cmdline is not patched"
    );
    g.poweroff().map(|_| ())
}

fn build_files() -> Result<Vec<(PathBuf, String)>, String> {
    build_lpvmm()?;
    let out = repo_root().join("target/lpvmm-test-patches/control");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let kp = out.join("nsleep-cmdline.kp");
    kp_build(
        &repo_root().join("patcher/examples/nsleep-cmdline.c"),
        &kp,
        &[],
    )?;
    Ok(vec![
        (kp, patch_path("nsleep-cmdline")),
        (PathBuf::from(env!("CARGO_BIN_EXE_ctl-probe")), PROBE.into()),
    ])
}

fn main() {
    host_files_or_exit(build_files());
    run_group(vec![
        host_trial("hostile_clients_leave_the_vm_untouched", hostile_clients),
        host_trial(
            "client_killed_mid_transition_changes_nothing",
            client_killed_mid_transition,
        ),
    ])
}
