//! Token estimates for limits and caps, with a real BPE tokenizer.
//!
//! DeepSeek's own tokenizer is not shipped in a crate; o200k_base (tiktoken)
//! is a close stand-in for English and code, and estimates only need to be
//! close: token limits settle against the engine's reported usage.
//!
//! Counting is the costliest step of a request with plugins (BPE over every
//! message), and most of a chat request's text was seen before: the system
//! prompt, and the whole history, re-sent with every turn. So counts of
//! longer texts are kept in a small LRU keyed by the text's hash.

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Mutex, OnceLock, PoisonError};

use lru::LruCache;
use tiktoken_rs::CoreBPE;

/// Texts shorter than this are counted each time: hashing them would save little.
const CACHE_MIN_BYTES: usize = 128;
/// Texts remembered (a key and a count each: ~60 bytes per entry).
const CACHE_ENTRIES: usize = 16_384;

fn bpe() -> &'static CoreBPE {
    static BPE: OnceLock<CoreBPE> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().expect("o200k_base ships inside tiktoken-rs"))
}

/// Load the tokenizer now rather than on the first request.
pub fn warm_up() {
    let _ = bpe();
}

/// Estimated tokens of a text.
pub fn estimate(text: &str) -> u32 {
    if text.is_empty() {
        return 0;
    }
    if text.len() < CACHE_MIN_BYTES {
        return count(text);
    }
    let key = cache_key(text);
    if let Some(&n) = cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        return n;
    }
    let n = count(text);
    cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .put(key, n);
    n
}

fn count(text: &str) -> u32 {
    u32::try_from(bpe().encode_ordinary(text).len()).unwrap_or(u32::MAX)
}

type Cache = Mutex<LruCache<(u64, usize), u32>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| {
        Mutex::new(LruCache::new(
            NonZeroUsize::new(CACHE_ENTRIES).expect("nonzero"),
        ))
    })
}

/// The text's hash with a per-process random key (so nobody can aim texts at
/// one slot), plus its length.
fn cache_key(text: &str) -> (u64, usize) {
    static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = STATE.get_or_init(Default::default).build_hasher();
    h.write(text.as_bytes());
    (h.finish(), text.len())
}

/// Chat template overhead per message (role markers), as engines count it.
pub const PER_MESSAGE_OVERHEAD: u32 = 4;

#[cfg(test)]
mod tests {
    #[test]
    fn counts_real_tokens() {
        assert_eq!(super::estimate(""), 0);
        let n = super::estimate("The quick brown fox jumps over the lazy dog.");
        assert!((8..=12).contains(&n), "{n}");
    }

    #[test]
    fn cached_counts_equal_fresh_counts() {
        let long = "Rivers carry sediment to the delta, where it settles. ".repeat(8);
        let other = format!("{long} And then the tide comes in.");
        for text in [&long, &other, &long, &other] {
            assert_eq!(super::estimate(text), super::count(text));
        }
        assert_ne!(super::estimate(&long), super::estimate(&other));
    }
}
