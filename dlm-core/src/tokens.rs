//! **Fencing tokens never go back.** Every grant carries a token
//! ([`FencingToken`](crate::FencingToken)) that storage behind the lock may compare with the
//! highest it has seen, to refuse a holder that lost its lock without
//! knowing (Chubby's sequencers). That only works if a later grant of a
//! resource always carries a larger token, whatever happened in between.
//! This is the whole story; the places that keep each part link here.
//!
//! 1. **Within a lockspace**: one counter per lockspace, not per resource
//!    (`lockspace/mod.rs`, `last_token`), so a resource freed and made
//!    again still gets larger tokens.
//! 2. **Across a lockspace released and created again** on a node: the node
//!    keeps the highest token any released lockspace handed out, and a new
//!    lockspace starts above it (`node/mod.rs`, `released_tokens`).
//! 3. **Across a restart of the agent**: every token is above
//!    [`NodeConfig::token_floor`](crate::NodeConfig::token_floor), which the
//!    agent sets from a generation kept on disk and raised at each start
//!    and as tokens grow (`dlm-agent`'s `generation.rs`): generation `g`'s
//!    tokens are above `g << 40`.
//! 4. **Across a mastership moving without a view** (a resource let go and
//!    mastered again elsewhere): the directory keeps the largest token it
//!    has heard of per lockspace and hands it with each lookup answer
//!    (`LookupReply::token_floor`); a new master raises its counter to it
//!    (`cluster/directory.rs`).
//! 5. **Across a view** (a master lost with tokens no survivor heard of):
//!    at each view every lockspace's counter is raised to
//!    [`epoch_token_floor`], `min(epoch, 2^23 - 1) << 40`, above any token
//!    of an earlier epoch as long as an epoch hands out fewer than 2^40
//!    tokens (`cluster/recovery`); surviving locks come back with their
//!    tokens and raise their master's counter too.
//! 6. **Epochs themselves never go back**: a view is quorate only when its
//!    agents are a majority of the configured weight, so any two quorate
//!    views share an agent, which reports the later epoch
//!    (`cluster/agree`); the agent records each view's epoch in its
//!    generation before taking it, so a cluster restarted whole starts
//!    above its last epoch (3.).
//! 7. **No wrap**: tokens stay below [`TOKEN_LIMIT`] (2^63); a peer's token
//!    or floor at or above it is refused as malformed, so no forged floor
//!    can make the next token wrap to 0 (`cluster/wire/decode.rs`).
//!
//! What is *not* promised: a holder paused past the lock-delay may still
//! act on a lock it lost; the token is what lets storage refuse it.

/// Bits of a fencing token below the epoch's (or generation's) part.
pub const TOKEN_EPOCH_SHIFT: u32 = 40;

/// Fencing tokens stay below this: epochs' floors stop at
/// `(2^23 - 1) << 40`, and an epoch hands out fewer than 2^40 tokens. A
/// peer's token or floor at or above it is refused as malformed (a forged
/// floor near 2^64 would otherwise make the next token wrap to 0).
pub const TOKEN_LIMIT: u64 = 1 << 63;

/// The fencing token every lockspace's counter is raised to in an epoch.
#[must_use]
pub const fn epoch_token_floor(epoch: u64) -> u64 {
    let max_epoch = (TOKEN_LIMIT >> TOKEN_EPOCH_SHIFT) - 1;
    let epoch = if epoch < max_epoch { epoch } else { max_epoch };
    epoch << TOKEN_EPOCH_SHIFT
}
