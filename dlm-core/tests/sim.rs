//! The cluster simulation over 1,000 seeds (more with `cargo xtask sim`).
//! A failure names its seed; `cargo xtask sim --seed N` replays it.

#[test]
fn a_thousand_seeds_of_a_simulated_cluster_keep_every_invariant() {
    let seeds: u64 = std::env::var("DLM_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let mut grants = 0u64;
    let mut deadlocks = 0u64;
    let mut unavailable = 0u64;
    let mut lost = 0u64;
    for seed in 0..seeds {
        let report =
            dlm_core::sim::run_seed(seed).unwrap_or_else(|e| panic!("{e}\nreplay: cargo xtask sim --seed {seed}"));
        grants += u64::from(report.grants);
        deadlocks += u64::from(report.deadlocks);
        unavailable += u64::from(report.unavailable);
        lost += report.lost;
    }
    // The workload must actually contend: grants and deadlock victims both occur.
    assert!(grants > seeds * 100, "{grants} grants over {seeds} seeds");
    assert!(deadlocks > 0, "no deadlock victim in {seeds} seeds: the workload no longer makes cycles");
    // Odd seeds cut links: messages are lost and requests fail over it.
    assert!(lost > 0 && unavailable > 0, "link faults had no effect: {lost} lost, {unavailable} unavailable");
}
