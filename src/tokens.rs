//! Token estimates for limits and caps, with a real BPE tokenizer.
//!
//! DeepSeek's own tokenizer is not shipped in a crate; o200k_base (tiktoken)
//! is a close stand-in for English and code, and estimates only need to be
//! close: token limits settle against the engine's reported usage.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

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
    u32::try_from(bpe().encode_ordinary(text).len()).unwrap_or(u32::MAX)
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
}
