//! A private `redis-server` per test: its own temporary directory and unix
//! socket, no TCP port, no persistence; killed on drop. Needs `redis-server`
//! on PATH (Debian package `redis-server`; `.ci/run` installs it).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Start a server and wait until it answers PING. Blocks (up to ~10 s);
    /// from async code, call it before the runtime work or via
    /// `spawn_blocking`.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        let mut server = RedisServer { dir, child: None };
        server.restart();
        server
    }

    /// `redis+unix:///…/redis.sock`: what `RedisStore::open` takes. Stays the
    /// same across [`RedisServer::stop`] and [`RedisServer::restart`].
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// Kill the server (SIGKILL, like a crash). Its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the server if running and start a new, empty one on the same
    /// socket path.
    pub fn restart(&mut self) {
        self.stop();
        let socket = self.socket();
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH; the Redis tests need it: \
                 apt-get install redis-server (the Debian package; .ci/run installs it)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(&socket) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server exited ({status}): {}", read_log(&log));
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server did not answer PING in 10 s: {}",
                    read_log(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freeze the server (SIGSTOP): connections are accepted by the kernel
    /// but nothing answers — a hung Redis. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}
