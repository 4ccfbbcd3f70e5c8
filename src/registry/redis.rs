//! The registry in Redis, shared by every replica behind the load balancer:
//! `{prefix}:blob:{sha256}` (the component's bytes), `{prefix}:index:{tenant}`
//! (the index JSON) and `{prefix}:revisions` (a hash, tenant -> revision,
//! which replicas poll to learn what changed; no pub/sub needed).
//!
//! Sync API on purpose: the registry calls the store from blocking threads.
//! One connection, opened lazily and dropped on any error, so a replica starts
//! (and keeps serving its last good set) while Redis is down, and recovers by
//! itself once Redis is back.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::{Client, ConnectionAddr, ErrorKind, RedisError};

use super::model::TenantIndex;
use super::store::{Store, StoreError};

/// The compare-and-swap, atomic in Redis across replicas. The revisions hash
/// is the authority: it and the index change together, or neither does.
/// Revisions are compared as the decimal strings we wrote, not as Lua
/// numbers (doubles).
const CAS: &str = r#"
local current = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
if current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"#;

pub struct RedisStore {
    client: Client,
    prefix: String,
    timeout: Duration,
    /// `None` until first use and after any error: a connection that failed
    /// may be half-way through a reply and must not be reused.
    conn: Mutex<Option<redis::Connection>>,
    cas: redis::Script,
    location: String,
}

impl RedisStore {
    /// `url`: `redis://[user:pass@]host[:port][/db]`, or a unix socket as
    /// `redis+unix:///path/redis.sock[?db=N&user=U&pass=P]` (`unix://` too).
    /// No connection is made here: only a malformed or unsupported URL fails
    /// (`rediss://` is not built in). `timeout` bounds connecting and every
    /// read and write, so a hung Redis cannot hold a thread forever.
    pub fn open(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        // The URL may carry a password: never echo it back.
        let client = Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid redis URL: {e}")))?;
        let info = client.get_connection_info();
        let db = info.redis_settings().db();
        let location = match info.addr() {
            ConnectionAddr::Tcp(host, port) if host.contains(':') => {
                format!("redis://[{host}]:{port}/{db}")
            }
            ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}/{db}"),
            ConnectionAddr::Unix(path) if db == 0 => format!("unix:{}", path.display()),
            ConnectionAddr::Unix(path) => format!("unix:{}?db={db}", path.display()),
            _ => {
                return Err(StoreError::Unavailable(
                    "redis URL: TLS (rediss://) is not supported; use redis:// or a unix socket"
                        .into(),
                ));
            }
        };
        Ok(RedisStore {
            client,
            prefix: prefix.to_owned(),
            timeout,
            conn: Mutex::new(None),
            cas: redis::Script::new(CAS),
            location,
        })
    }

    /// Run `op` on the connection, connecting first if needed. Calls are
    /// serialised on the one connection: the registry's traffic is a poll
    /// every ~250 ms plus rare uploads, not worth a pool.
    fn with_conn<T>(
        &self,
        op: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = match slot.as_mut() {
            Some(conn) => op(conn),
            None => self.connect().and_then(|conn| op(slot.insert(conn))),
        };
        result.map_err(|e| {
            *slot = None;
            self.error(e)
        })
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        // Bounds the connect and the handshake (AUTH, SELECT) ...
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        // ... and, from here on, every command.
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    fn error(&self, e: RedisError) -> StoreError {
        match e.kind() {
            // The reply arrived but is not what we stored.
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
                StoreError::Corrupt(format!("{}: {e}", self.location))
            }
            _ => StoreError::Unavailable(format!("{}: {e}", self.location)),
        }
    }

    fn blob_key(&self, sha256: &str) -> Result<String, StoreError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Corrupt(format!("not a sha256: {sha256:?}")));
        }
        Ok(format!("{}:blob:{sha256}", self.prefix))
    }

    fn index_key(&self, tenant: &str) -> String {
        // Tenant ids are restricted by config validation to a safe set.
        format!("{}:index:{tenant}", self.prefix)
    }

    fn revisions_key(&self) -> String {
        format!("{}:revisions", self.prefix)
    }
}

impl Store for RedisStore {
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let key = self.blob_key(sha256)?;
        // NX: content-addressed, so an existing blob is already right.
        self.with_conn(|c| redis::cmd("SET").arg(&key).arg(bytes).arg("NX").query(c))
    }

    fn get_blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.blob_key(sha256)?;
        self.with_conn(|c| redis::cmd("GET").arg(&key).query(c))
    }

    fn read_index(&self, tenant: &str) -> Result<Option<TenantIndex>, StoreError> {
        let key = self.index_key(tenant);
        let bytes: Option<Vec<u8>> = self.with_conn(|c| redis::cmd("GET").arg(&key).query(c))?;
        bytes
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("{} {key}: {e}", self.location)))
    }

    fn write_index(&self, tenant: &str, next: &TenantIndex) -> Result<bool, StoreError> {
        let Some(previous) = next.revision.checked_sub(1) else {
            return Ok(false);
        };
        let json = serde_json::to_vec(next)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode index: {e}")))?;
        // An `Unavailable` here (a timeout, a dropped connection) does not
        // say whether the script ran: the caller re-reads before retrying.
        let (index_key, revisions_key) = (self.index_key(tenant), self.revisions_key());
        let swapped: i64 = self.with_conn(|c| {
            self.cas
                .key(&index_key)
                .key(&revisions_key)
                .arg(tenant)
                .arg(previous.to_string())
                .arg(next.revision.to_string())
                .arg(&json)
                .invoke(c)
        })?;
        Ok(swapped == 1)
    }

    fn revisions(&self) -> Result<HashMap<String, u64>, StoreError> {
        let key = self.revisions_key();
        let raw: HashMap<String, String> =
            self.with_conn(|c| redis::cmd("HGETALL").arg(&key).query(c))?;
        raw.into_iter()
            .map(|(tenant, rev)| match rev.parse() {
                Ok(rev) => Ok((tenant, rev)),
                Err(_) => Err(StoreError::Corrupt(format!(
                    "{} {key}: revision of {tenant:?} is {rev:?}",
                    self.location
                ))),
            })
            .collect()
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Against a real server: tests/registry_redis.rs.

    #[test]
    fn location_has_no_secrets_and_open_does_not_connect() {
        let t = Duration::from_secs(1);
        let at = |url| RedisStore::open(url, "p", t).map(|s| s.location());
        assert_eq!(
            at("redis://user:hunter2@10.0.0.7:6380/3").unwrap(),
            "redis://10.0.0.7:6380/3"
        );
        assert_eq!(
            at("redis://:hunter2@[::1]").unwrap(),
            "redis://[::1]:6379/0"
        );
        assert_eq!(
            at("redis+unix:///run/redis.sock?pass=hunter2").unwrap(),
            "unix:/run/redis.sock"
        );
        assert_eq!(
            at("unix:///run/redis.sock?db=2").unwrap(),
            "unix:/run/redis.sock?db=2"
        );
        assert!(at("rediss://example.com").is_err());
        assert!(at("http://example.com").is_err());
        assert!(at("not a url").is_err());
    }
}
