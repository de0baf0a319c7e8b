//! Fencing tokens.

use super::*;

#[test]
fn fencing_tokens_increase_across_grants_conversions_and_resource_lifetimes() {
    let mut h = harness();
    let mut tokens = Vec::new();
    for round in 0..3 {
        for effect in h.lock(1, 1, "a", Pr, NONE).into_iter().chain(h.convert(1, 1, Ex, NONE)) {
            let Effect::Complete(Completion { token: Some(token), .. }) = effect else { panic!("{effect:?}") };
            tokens.push(token.0);
        }
        h.unlock(1, 1);
        assert!(h.node.dump(h.ls, None, 10).expect("dump").is_empty(), "round {round}: resource freed");
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}
