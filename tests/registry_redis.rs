//! The registry's Redis store against a real `redis-server` (one per test,
//! started by the test on a private unix socket; needs `redis-server` on PATH).

mod support;

use std::time::Duration;

use sluice::registry::model::TenantIndex;
use sluice::registry::redis::RedisStore;
use sluice::registry::store::{Store, StoreError};
use support::redis::RedisServer;

const TIMEOUT: Duration = Duration::from_secs(2);

fn store(server: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::open(&server.url(), prefix, TIMEOUT).expect("valid URL")
}

fn index(revision: u64) -> TenantIndex {
    TenantIndex {
        revision,
        ..Default::default()
    }
}

fn unavailable<T: std::fmt::Debug>(r: Result<T, StoreError>) {
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "expected Unavailable, got {r:?}"
    );
}

#[test]
fn compare_and_swap() {
    let server = RedisServer::start();
    let store = store(&server, "sluice");
    assert_eq!(store.read_index("acme").unwrap(), None);
    assert!(store.revisions().unwrap().is_empty());
    // Revision 0 can never be written: no stored index already is revision 0.
    assert!(!store.write_index("acme", &index(0)).unwrap());
    // Skipping a revision loses too.
    assert!(!store.write_index("acme", &index(2)).unwrap());

    assert!(store.write_index("acme", &index(1)).unwrap());
    // A second writer that read revision 0 loses.
    assert!(!store.write_index("acme", &index(1)).unwrap());
    let mut two = index(2);
    two.chain = Some(vec![]);
    assert!(store.write_index("acme", &two).unwrap());
    assert!(store.write_index("globex", &index(1)).unwrap());

    assert_eq!(store.read_index("acme").unwrap(), Some(two));
    let revisions = store.revisions().unwrap();
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions["acme"], 2);
    assert_eq!(revisions["globex"], 1);
}

#[test]
fn blobs_round_trip_and_are_idempotent() {
    let server = RedisServer::start();
    let store = store(&server, "sluice");
    let sha = "ab".repeat(32);
    assert_eq!(store.get_blob(&sha).unwrap(), None);
    let wasm: Vec<u8> = (0..=255).cycle().take(300_000).collect();
    store.put_blob(&sha, &wasm).unwrap();
    store.put_blob(&sha, &wasm).unwrap();
    // Content-addressed: a second put never replaces what is stored.
    store.put_blob(&sha, b"other").unwrap();
    assert_eq!(store.get_blob(&sha).unwrap(), Some(wasm));

    for bad in ["../etc", "", &"g".repeat(64), &"ab".repeat(33)] {
        assert!(matches!(store.get_blob(bad), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            store.put_blob(bad, b"x"),
            Err(StoreError::Corrupt(_))
        ));
    }
}

#[test]
fn two_stores_see_each_others_writes() {
    let server = RedisServer::start();
    let (a, b) = (store(&server, "sluice"), store(&server, "sluice"));
    let sha = "0f".repeat(32);
    a.put_blob(&sha, b"wasm").unwrap();
    assert!(a.write_index("acme", &index(1)).unwrap());

    assert_eq!(b.get_blob(&sha).unwrap().as_deref(), Some(&b"wasm"[..]));
    assert_eq!(b.revisions().unwrap()["acme"], 1);
    // b raced a: it also read revision 0, and loses.
    assert!(!b.write_index("acme", &index(1)).unwrap());
    assert!(b.write_index("acme", &index(2)).unwrap());

    assert_eq!(a.read_index("acme").unwrap().unwrap().revision, 2);
    assert_eq!(a.revisions().unwrap()["acme"], 2);
    assert!(!a.write_index("acme", &index(2)).unwrap());
}

#[test]
fn prefixes_are_isolated() {
    let server = RedisServer::start();
    let (a, b) = (store(&server, "east"), store(&server, "west"));
    let sha = "cd".repeat(32);
    a.put_blob(&sha, b"east").unwrap();
    assert!(a.write_index("acme", &index(1)).unwrap());

    assert_eq!(b.get_blob(&sha).unwrap(), None);
    assert_eq!(b.read_index("acme").unwrap(), None);
    assert!(b.revisions().unwrap().is_empty());
    // b's revision 1 is its own, not a lost race with a's.
    assert!(b.write_index("acme", &index(1)).unwrap());
    b.put_blob(&sha, b"west").unwrap();
    assert_eq!(a.get_blob(&sha).unwrap().as_deref(), Some(&b"east"[..]));
    assert_eq!(b.get_blob(&sha).unwrap().as_deref(), Some(&b"west"[..]));
}

#[test]
fn corrupt_data_is_reported_as_corrupt() {
    let server = RedisServer::start();
    let store = store(&server, "sluice");
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("SET")
        .arg("sluice:index:acme")
        .arg("{not json")
        .query(&mut raw)
        .unwrap();
    assert!(matches!(
        store.read_index("acme"),
        Err(StoreError::Corrupt(_))
    ));
    let () = redis::cmd("HSET")
        .arg("sluice:revisions")
        .arg("acme")
        .arg("seven")
        .query(&mut raw)
        .unwrap();
    assert!(matches!(store.revisions(), Err(StoreError::Corrupt(_))));
    // Neither error spoiled the connection.
    assert_eq!(store.get_blob(&"ab".repeat(32)).unwrap(), None);
}

fn every_op_is_unavailable(store: &RedisStore) {
    let sha = "ef".repeat(32);
    unavailable(store.put_blob(&sha, b"wasm"));
    unavailable(store.get_blob(&sha));
    unavailable(store.read_index("acme"));
    unavailable(store.write_index("acme", &index(1)));
    unavailable(store.revisions());
}

#[test]
fn unavailable_while_down_then_reconnects() {
    let mut server = RedisServer::start();
    let store = store(&server, "sluice");
    assert!(store.write_index("acme", &index(1)).unwrap());

    server.stop();
    // Twice: the first round fails on the old connection, the second on
    // connecting.
    every_op_is_unavailable(&store);
    every_op_is_unavailable(&store);
    assert!(store.location().starts_with("unix:"));

    // Opening while Redis is down succeeds: a replica must start anyway.
    let late = RedisStore::open(&server.url(), "sluice", TIMEOUT).unwrap();
    every_op_is_unavailable(&late);

    // A new, empty server on the same socket: the same values work again.
    server.restart();
    for s in [&store, &late] {
        assert!(s.revisions().unwrap().is_empty());
    }
    assert!(store.write_index("acme", &index(1)).unwrap());
    assert_eq!(late.read_index("acme").unwrap().unwrap().revision, 1);
    let sha = "ef".repeat(32);
    late.put_blob(&sha, b"wasm").unwrap();
    assert_eq!(store.get_blob(&sha).unwrap().as_deref(), Some(&b"wasm"[..]));
}

#[test]
fn a_hung_server_times_out_then_recovers() {
    let server = RedisServer::start();
    let store = RedisStore::open(&server.url(), "sluice", Duration::from_millis(200)).unwrap();
    assert!(store.write_index("acme", &index(1)).unwrap());

    server.pause();
    // Each call gives up after the timeout instead of blocking forever.
    every_op_is_unavailable(&store);
    server.resume();

    assert_eq!(store.revisions().unwrap()["acme"], 1);
    assert!(store.write_index("acme", &index(2)).unwrap());
}

#[test]
fn concurrent_writers_never_both_win() {
    let server = RedisServer::start();
    let wins: u64 = std::thread::scope(|s| {
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let store = store(&server, "sluice");
                s.spawn(move || {
                    let mut wins = 0;
                    while wins < 25 {
                        let current = store.revisions().unwrap().get("acme").copied();
                        if store
                            .write_index("acme", &index(current.unwrap_or(0) + 1))
                            .unwrap()
                        {
                            wins += 1;
                        }
                    }
                    wins
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    // Every successful swap moved the revision by exactly one.
    let store = store(&server, "sluice");
    assert_eq!(store.revisions().unwrap()["acme"], wins);
    assert_eq!(store.read_index("acme").unwrap().unwrap().revision, wins);
}
