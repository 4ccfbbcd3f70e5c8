//! What the gateway and scale benchmarks share: child processes pinned to a
//! core and killed on drop, readiness polls, resident memory and CPU time from
//! /proc, the machine's description, and one marked section of BENCHMARKS.md.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The release binary cargo built for this bench.
pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// Where children's logs and generated configs go.
pub fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench")
        .join(name);
    fs::create_dir_all(&dir).expect("create the bench work directory");
    dir
}

/// A child process (and its own children: nginx's workers) that is killed
/// when dropped, so a failed bench leaves nothing running.
pub struct Proc {
    pub name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args`, on core `cpu` when given (taskset), with its
    /// output in `dir/<name>.log`.
    pub fn spawn(
        name: &str,
        dir: &Path,
        cpu: Option<usize>,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("create log file");
        let mut cmd = match cpu {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &c.to_string(), program]);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({program}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the log's tail when the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("{} exited ({status}):\n{tail}", self.name);
        }
    }

    /// Resident memory of the process and its children, in KiB.
    pub fn rss_kib(&self) -> u64 {
        tree(self.pid())
            .iter()
            .map(|&p| status_kib(p, "VmRSS:"))
            .sum()
    }

    /// Peak resident memory of the process and its children, in KiB.
    pub fn hwm_kib(&self) -> u64 {
        tree(self.pid())
            .iter()
            .map(|&p| status_kib(p, "VmHWM:"))
            .sum()
    }

    /// CPU time used so far by every thread of the process and its children.
    pub fn cpu(&self) -> Duration {
        tree(self.pid()).iter().map(|&p| cpu_of(p)).sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so nginx's master takes its workers down with it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid` and its descendants (nginx's master and workers; a taskset wrapper
/// execs, so it is the process itself).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(entries) = fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if ppid(p) == Some(parent) {
                    all.push(p);
                }
            }
        }
        i += 1;
    }
    all
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Sum of the threads' run time (schedstat, nanoseconds; finer than the
/// 10 ms ticks of /proc/PID/stat).
fn cpu_of(pid: u32) -> Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Plain HTTP/1.1 GET; the status and body, or None when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_owned()))
}

/// Polls `GET path` until it answers 200; the time it took.
pub fn wait_ok(p: &mut Proc, addr: SocketAddr, path: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some((200, _)) = http_get(addr, path) {
            return start.elapsed();
        }
        p.assert_running();
        assert!(
            start.elapsed() < timeout,
            "{} did not answer 200 on {path} within {timeout:?}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Raises the open-file limit towards `want` (the hard limit too, when
/// allowed); children inherit it. Returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let soft = want.min(hard);
    let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |l| l.0)
}

/// Pins the calling process (all threads created after this) to one core.
pub fn pin_self(cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu index in range");
    sched_setaffinity(Pid::from_raw(0), &set).expect("pin the load generator");
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU model, cores, memory, kernel and compiler: the "machine" line.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let mem_gib = status_like("/proc/meminfo", "MemTotal:") as f64 / (1 << 20) as f64;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{model}, {} cores, {mem_gib:.0} GiB, Linux {}, {rustc}",
        num_cpus_online(),
        kernel.trim()
    )
}

fn num_cpus_online() -> usize {
    // All the machine's cores, not only those this process is pinned to.
    fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(1)
}

fn status_like(file: &str, key: &str) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Replaces the `<!-- NAME:start -->` .. `<!-- NAME:end -->` section of
/// `file` with `body` (adding it at the end when absent).
pub fn write_section(file: &Path, name: &str, body: &str) {
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let section = format!("{start}\n{}\n{end}\n", body.trim_end());
    let old = fs::read_to_string(file).unwrap_or_else(|_| "# Benchmarks\n\n".to_owned());
    let new = match (old.find(&start), old.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            let after = old[e + end.len()..].trim_start_matches('\n');
            format!(
                "{}{section}{}{after}",
                &old[..b],
                if after.is_empty() { "" } else { "\n" }
            )
        }
        _ => format!(
            "{}\n{section}",
            old.trim_end_matches('\n').to_owned() + "\n"
        ),
    };
    fs::write(file, new).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    println!("wrote the {name} section of {}", file.display());
}

/// `--write FILE` from the bench's arguments.
pub fn write_target() -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

/// `--flag VALUE` from the bench's arguments.
pub fn arg<T: std::str::FromStr>(flag: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag}: cannot parse {v:?}"))
        })
}

pub fn has_flag(flag: &str) -> bool {
    std::env::args().any(|a| a == flag)
}

/// nginx as a plain reverse proxy to `engine` on `listen`: one worker,
/// HTTP/1.1 keep-alive to the engine, no buffering (server-sent events pass
/// as they come), no access log; its files in `dir`. Waits until it answers.
pub fn nginx(
    dir: &Path,
    cpu: Option<usize>,
    listen: SocketAddr,
    engine: SocketAddr,
    connections: usize,
) -> Proc {
    let d = dir.display();
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        fs::create_dir_all(dir.join(t)).expect("nginx temp dir");
    }
    let conf = format!(
        r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
worker_rlimit_nofile {files};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream engine {{ server {engine}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen {listen} backlog=4096;
        keepalive_requests 1000000;
        client_max_body_size 8m;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 1h;
            proxy_buffering off;
        }}
    }}
}}
"#,
        files = connections + 64,
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).expect("write nginx.conf");
    let prefix = format!("{d}/");
    let path = path.display().to_string();
    let mut p = Proc::spawn(
        "nginx",
        dir,
        cpu,
        &nginx_binary(),
        &["-e", "stderr", "-p", &prefix, "-c", &path],
        &[],
    );
    wait_ok(&mut p, listen, "/health", Duration::from_secs(30));
    p
}

fn nginx_binary() -> String {
    ["nginx", "/usr/sbin/nginx"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("-v")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: `bash benches/run.sh` installs it (apt-get install nginx)"
            )
        })
        .to_owned()
}

pub fn nginx_version() -> String {
    Command::new(nginx_binary())
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_default()
}
