//! What `dlm-agent run` does with eBPF: load and attach the configured
//! families (`[ebpf] families`, `Family::AGENT_DEFAULT` unless configured)
//! when permitted, hand the attribution maps to the driver, and read the
//! rest into metrics. When not permitted (or turned off), one log line, a
//! metric that says so, and the agent runs on without.

use std::sync::{Arc, Mutex};

use super::{
    AttributionMaps, Probes, Settings,
    kernel_metrics::{EbpfState, KernelMetrics},
    map_reader::{self, Reader, ReaderGuard, Snapshot},
};

/// The agent's eBPF pieces.
pub struct AgentEbpf {
    /// For the driver's kernel evidence (`None`: eBPF is off).
    pub attribution: Option<AttributionMaps>,
    /// The Prometheus collector (always present: it says whether eBPF is on).
    pub metrics: KernelMetrics,
    /// Keeps the map reader running.
    pub reader: Option<ReaderGuard>,
}

/// Loads and attaches the configured families, or explains why not.
pub fn start(config: &crate::config::Config) -> AgentEbpf {
    let (enabled, interval, long_stall) = (config.ebpf, config.ebpf_interval, config.ebpf_long_stall);
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let off = |state: EbpfState| AgentEbpf {
        attribution: None,
        metrics: KernelMetrics::new(state, snapshot.clone()),
        reader: None,
    };
    if !enabled {
        tracing::info!("eBPF observation is off (--no-ebpf)");
        return off(EbpfState::Disabled);
    }
    // The per-thread array of `sched` is sized for every thread id only
    // when that family is configured: megabytes of kernel memory otherwise.
    let sched = config.ebpf_families.contains(&super::Family::Sched);
    let settings = Settings { long_stall, sched, ..Settings::default() };
    let mut probes = match Probes::load(&settings) {
        Ok(probes) => probes,
        Err(error) => {
            tracing::warn!("eBPF observation is off: {error}");
            return off(EbpfState::Unavailable(error.to_string()));
        }
    };
    // Each family on its own: one that cannot attach (a tracepoint missing
    // from this kernel, tracefs not readable) leaves the others working.
    for &family in &config.ebpf_families {
        if let Err(error) = probes.attach(&[family]) {
            if probes.attached().contains(&family) {
                tracing::warn!(family = family.as_str(), "eBPF family attached in part: {error}");
            } else {
                tracing::warn!(family = family.as_str(), "eBPF family not attached: {error}");
            }
        }
    }
    if probes.attached().is_empty() {
        tracing::warn!("eBPF observation is off: no program family could be attached");
        return off(EbpfState::Unavailable("no family attached".into()));
    }
    let attribution = probes.take_attribution_maps();
    tracing::info!(links = probes.links(), "eBPF programs attached");
    let reader = map_reader::spawn(Reader::new(probes), interval, snapshot.clone());
    AgentEbpf { attribution, metrics: KernelMetrics::new(EbpfState::On, snapshot), reader: Some(reader) }
}
