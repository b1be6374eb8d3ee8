//! The simulation backend: a [`Backend`] in virtual time. No data moves.
//!
//! Every stream has a virtual clock. A copy starts when both its stream and its
//! link are free (`max(stream clock, link free time)`) and takes
//! `latency + bytes / bandwidth` ([`copy_seconds`]); host-to-device and
//! device-to-host copies use separate links when the interconnect is full
//! duplex and the GPU has two or more copy engines, and one shared link
//! (claimed in issue order) otherwise. Device-to-device and host-to-host
//! copies use [`SimConfig::local_bandwidth`] and no link. [`SimBackend::compute`]
//! advances a stream's clock by a layer's compute time. `record` stamps an
//! event with its stream's clock; `wait` moves a stream's clock up to the
//! event's stamp. Everything is deterministic.
//!
//! [`Backend::synchronize_queues`] is the host waiting for the copy queues:
//! every stream's clock moves up to the moment the last copy ended, since
//! nothing the host issues afterwards can start earlier.
//!
//! The engine runs on it unchanged ([`crate::simulate`] drives it): what the
//! simulator predicts is what the shipped schedule, swapper and policy do.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::backend::{check_copy_bounds, Backend, Buffer, CopyShape, Mem, Stream};
use crate::error::{PieError, Result};
use crate::policy::cost_model::copy_seconds;
use crate::policy::LinkModel;
use std::sync::Arc;

/// The simulated machine's copy paths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimConfig {
    /// Host-to-device bandwidth, bytes per second.
    pub h2d_bandwidth: f64,
    /// Fixed cost of one host-to-device copy, seconds.
    pub h2d_latency: f64,
    /// Device-to-host bandwidth, bytes per second.
    pub d2h_bandwidth: f64,
    /// Fixed cost of one device-to-host copy, seconds.
    pub d2h_latency: f64,
    /// Whether both directions can run at full rate at once.
    pub full_duplex: bool,
    /// Number of copy engines; with fewer than two, copies of both directions
    /// run one at a time even on a full-duplex link.
    pub copy_engines: usize,
    /// Bandwidth of device-to-device and host-to-host copies, bytes per second.
    pub local_bandwidth: f64,
    /// Compute seconds lost per byte crossing the link: copies that share the
    /// processor and memory with compute (the host backend's memcpy threads)
    /// slow it down; a GPU's copy engines do not (0, the default).
    pub copy_compute_cost: f64,
}

impl Default for SimConfig {
    /// A PCIe Gen4 x16 box: 25 GB/s and 10 us each way, full duplex, two copy engines.
    fn default() -> Self {
        SimConfig {
            h2d_bandwidth: 25e9,
            h2d_latency: 10e-6,
            d2h_bandwidth: 25e9,
            d2h_latency: 10e-6,
            full_duplex: true,
            copy_engines: 2,
            local_bandwidth: 1e12,
            copy_compute_cost: 0.0,
        }
    }
}

impl SimConfig {
    /// A simulated machine whose copies behave as `link` says.
    pub fn from_link(link: LinkModel) -> Self {
        SimConfig {
            h2d_bandwidth: link.h2d_bandwidth,
            h2d_latency: link.h2d_latency,
            d2h_bandwidth: link.d2h_bandwidth,
            d2h_latency: link.d2h_latency,
            full_duplex: !link.shared,
            ..SimConfig::default()
        }
    }

    /// The link as the cost model sees it.
    pub fn link_model(&self) -> LinkModel {
        LinkModel {
            h2d_bandwidth: self.h2d_bandwidth,
            h2d_latency: self.h2d_latency,
            d2h_bandwidth: self.d2h_bandwidth,
            d2h_latency: self.d2h_latency,
            shared: !self.full_duplex || self.copy_engines < 2,
        }
    }

    /// Checks bandwidths and latencies are usable and there is a copy engine.
    pub fn validate(&self) -> Result<()> {
        self.link_model().validate()?;
        if self.copy_engines == 0 {
            return Err(PieError::config(
                "a simulated GPU needs at least one copy engine",
            ));
        }
        if !(self.local_bandwidth.is_finite() && self.local_bandwidth > 0.0) {
            return Err(PieError::config(
                "local copy bandwidth must be positive and finite",
            ));
        }
        if !(self.copy_compute_cost.is_finite() && self.copy_compute_cost >= 0.0) {
            return Err(PieError::config(format!(
                "a copy's compute cost must be a finite, non-negative number of seconds per byte (got {})",
                self.copy_compute_cost
            )));
        }
        Ok(())
    }
}

/// Memory of the simulated backend: a unique fake address and a length.
#[derive(Debug)]
pub struct SimBuffer {
    addr: u64,
    len: usize,
}

impl Buffer for SimBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn addr(&self) -> u64 {
        self.addr
    }
}

/// An event of the simulated backend: the virtual time of its last record.
#[derive(Debug, Default)]
pub struct SimEvent {
    time: Mutex<Option<f64>>,
}

impl SimEvent {
    /// The virtual time of the last record, if any.
    pub fn time(&self) -> Option<f64> {
        *self.time.lock()
    }
}

/// Cumulative copy counters of a [`SimBackend`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SimStats {
    /// Host-to-device bytes copied.
    pub h2d_bytes: u64,
    /// Seconds host-to-device copies took (sum of durations, waits excluded).
    pub h2d_seconds: f64,
    /// Host-to-device copies issued.
    pub h2d_copies: u64,
    /// Device-to-host bytes copied.
    pub d2h_bytes: u64,
    /// Seconds device-to-host copies took.
    pub d2h_seconds: f64,
    /// Device-to-host copies issued.
    pub d2h_copies: u64,
}

#[derive(Debug)]
struct SimState {
    config: SimConfig,
    clocks: HashMap<Stream, f64>,
    /// Free time of the H2D link (index 0) and the D2H link (index 1; unused when shared).
    link_free: [f64; 2],
    next_addr: u64,
    stats: SimStats,
    /// Compute seconds that link copies have taken from the processor since
    /// the last [`SimBackend::compute`] ([`SimConfig::copy_compute_cost`]).
    compute_debt: f64,
}

/// A [`Backend`] in virtual time (see the module docs). A handle: clones
/// share one simulated machine, so a driver can keep one while an engine owns another.
#[derive(Clone, Debug)]
pub struct SimBackend {
    state: Arc<Mutex<SimState>>,
}

/// Fake addresses start here and advance by each allocation, 4 KiB aligned.
const ADDR_BASE: u64 = 0x1000_0000;

impl SimBackend {
    /// A simulated machine; errors when `config` is unusable.
    pub fn new(config: SimConfig) -> Result<Self> {
        config.validate()?;
        Ok(SimBackend {
            state: Arc::new(Mutex::new(SimState {
                config,
                clocks: HashMap::new(),
                link_free: [0.0; 2],
                next_addr: ADDR_BASE,
                stats: SimStats::default(),
                compute_debt: 0.0,
            })),
        })
    }

    /// The current configuration.
    pub fn config(&self) -> SimConfig {
        self.state.lock().config
    }

    /// Changes the machine from now on (e.g. the link slows down mid-run);
    /// copies already issued keep their times.
    pub fn set_config(&self, config: SimConfig) -> Result<()> {
        config.validate()?;
        self.state.lock().config = config;
        Ok(())
    }

    /// Advances `stream`'s clock by `seconds` of work (a layer's compute),
    /// plus what the link copies issued since the last compute took from the
    /// processor ([`SimConfig::copy_compute_cost`]).
    pub fn compute(&self, stream: Stream, seconds: f64) -> Result<()> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(PieError::config(format!(
                "simulated compute must take a finite, non-negative time (got {seconds})"
            )));
        }
        let mut st = self.state.lock();
        let debt = std::mem::take(&mut st.compute_debt);
        *st.clocks.entry(stream).or_insert(0.0) += seconds + debt;
        Ok(())
    }

    /// The virtual clock of `stream` (0 before its first command).
    pub fn stream_clock(&self, stream: Stream) -> f64 {
        self.state
            .lock()
            .clocks
            .get(&stream)
            .copied()
            .unwrap_or(0.0)
    }

    /// Cumulative copy counters.
    pub fn stats(&self) -> SimStats {
        self.state.lock().stats
    }

    fn alloc(&self, bytes: usize) -> SimBuffer {
        let mut st = self.state.lock();
        let addr = st.next_addr;
        st.next_addr += (bytes.max(1) as u64).div_ceil(4096) * 4096;
        SimBuffer { addr, len: bytes }
    }
}

impl Backend for SimBackend {
    type DeviceBuffer = SimBuffer;
    type HostBuffer = SimBuffer;
    type Event = SimEvent;

    fn name(&self) -> &'static str {
        "sim"
    }

    fn alloc_device(&self, bytes: usize) -> Result<SimBuffer> {
        Ok(self.alloc(bytes))
    }

    fn alloc_host(&self, bytes: usize) -> Result<SimBuffer> {
        Ok(self.alloc(bytes))
    }

    fn new_event(&self) -> Result<SimEvent> {
        Ok(SimEvent::default())
    }

    fn copy(
        &self,
        stream: Stream,
        src: Mem<'_, Self>,
        dst: Mem<'_, Self>,
        shape: CopyShape,
    ) -> Result<()> {
        check_copy_bounds(&src, &dst, &shape)?;
        let bytes = shape.bytes() as u64;
        let mut st = self.state.lock();
        let cfg = st.config;
        let link = cfg.link_model();
        // (duration, link index if the copy crosses the interconnect, is h2d)
        let (dur, link_index, h2d) = match (src.is_device(), dst.is_device()) {
            (false, true) => (
                copy_seconds(bytes, cfg.h2d_bandwidth, cfg.h2d_latency),
                Some(0),
                Some(true),
            ),
            (true, false) => (
                copy_seconds(bytes, cfg.d2h_bandwidth, cfg.d2h_latency),
                Some(if link.shared { 0 } else { 1 }),
                Some(false),
            ),
            _ => (bytes as f64 / cfg.local_bandwidth, None, None),
        };
        let clock = st.clocks.get(&stream).copied().unwrap_or(0.0);
        let start = match link_index {
            Some(i) => clock.max(st.link_free[i]),
            None => clock,
        };
        let end = start + dur;
        st.clocks.insert(stream, end);
        if let Some(i) = link_index {
            st.link_free[i] = end;
            st.compute_debt += bytes as f64 * cfg.copy_compute_cost;
        }
        match h2d {
            Some(true) => {
                st.stats.h2d_bytes += bytes;
                st.stats.h2d_seconds += dur;
                st.stats.h2d_copies += 1;
            }
            Some(false) => {
                st.stats.d2h_bytes += bytes;
                st.stats.d2h_seconds += dur;
                st.stats.d2h_copies += 1;
            }
            None => {}
        }
        Ok(())
    }

    fn record(&self, event: &SimEvent, stream: Stream) -> Result<()> {
        let t = self.stream_clock(stream);
        *event.time.lock() = Some(t);
        Ok(())
    }

    fn wait(&self, stream: Stream, event: &SimEvent) -> Result<()> {
        if let Some(t) = event.time() {
            let mut st = self.state.lock();
            let c = st.clocks.entry(stream).or_insert(0.0);
            *c = c.max(t);
        }
        Ok(())
    }

    fn query(&self, _event: &SimEvent) -> Result<bool> {
        Ok(true)
    }

    fn synchronize(&self, _event: &SimEvent) -> Result<()> {
        Ok(())
    }

    fn elapsed(&self, start: &SimEvent, end: &SimEvent) -> Result<f64> {
        match (start.time(), end.time()) {
            (Some(a), Some(b)) => Ok(b - a),
            _ => Err(PieError::state("elapsed() needs two recorded events")),
        }
    }

    fn synchronize_queues(&self) -> Result<()> {
        // The host waits until every copy finished; whatever it issues next,
        // on any stream, starts no earlier.
        let mut st = self.state.lock();
        let host = st.clocks.values().copied().fold(0.0, f64::max);
        let host = st.link_free.iter().copied().fold(host, f64::max);
        for clock in st.clocks.values_mut() {
            *clock = host;
        }
        for stream in [Stream::H2D, Stream::D2H] {
            st.clocks.insert(stream, host);
        }
        Ok(())
    }

    /// The host's virtual time: the latest clock among foreign (compute)
    /// streams, 0 before any. The host is taken to keep pace with the
    /// computation it drives; the backend's copy queues run ahead of it
    /// asynchronously and do not move it.
    fn now(&self) -> f64 {
        let st = self.state.lock();
        st.clocks
            .iter()
            .filter(|(s, _)| matches!(s, Stream::Foreign(_)))
            .map(|(_, &t)| t)
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_copies_take_their_compute_cost_from_the_next_compute_only() {
        let b = SimBackend::new(SimConfig {
            copy_compute_cost: 1e-9,
            ..SimConfig::default()
        })
        .unwrap();
        let host = b.alloc_host(2_000_000).unwrap();
        let dev = b.alloc_device(2_000_000).unwrap();
        let whole = CopyShape::contiguous(1_000_000);
        b.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            whole,
        )
        .unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&host, 0),
            whole,
        )
        .unwrap();
        // A device-local copy crosses no link and costs the processor nothing.
        b.copy(
            Stream::H2D,
            Mem::Device(&dev, 0),
            Mem::Device(&dev, 1_000_000),
            whole,
        )
        .unwrap();
        b.compute(Stream::Foreign(0), 0.01).unwrap();
        assert!((b.stream_clock(Stream::Foreign(0)) - 0.012).abs() < 1e-12);
        b.compute(Stream::Foreign(0), 0.01).unwrap();
        assert!((b.stream_clock(Stream::Foreign(0)) - 0.022).abs() < 1e-12);
        let bad = SimBackend::new(SimConfig {
            copy_compute_cost: -1.0,
            ..SimConfig::default()
        })
        .expect_err("refused");
        assert!(bad.to_string().contains("compute cost"), "{bad}");
    }

    #[test]
    fn copy_time_is_latency_plus_bytes_over_bandwidth() {
        let b = SimBackend::new(SimConfig {
            h2d_bandwidth: 1e9,
            h2d_latency: 1e-5,
            ..SimConfig::default()
        })
        .unwrap();
        let host = b.alloc_host(1_000_000).unwrap();
        let dev = b.alloc_device(1_000_000).unwrap();
        assert_ne!(host.addr(), dev.addr());
        let e = b.new_event().unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1_000_000),
        )
        .unwrap();
        b.record(&e, Stream::H2D).unwrap();
        assert!((e.time().unwrap() - (1e-5 + 1e-3)).abs() < 1e-15);
        b.wait(Stream::Foreign(0), &e).unwrap();
        assert_eq!(b.now(), e.time().unwrap());
        assert!(b
            .copy(
                Stream::H2D,
                Mem::Host(&host, 1),
                Mem::Device(&dev, 0),
                CopyShape::contiguous(1_000_000)
            )
            .is_err());
    }

    #[test]
    fn half_duplex_serialises_directions() {
        let cfg = SimConfig {
            h2d_bandwidth: 1e9,
            h2d_latency: 0.0,
            d2h_bandwidth: 1e9,
            d2h_latency: 0.0,
            full_duplex: false,
            ..SimConfig::default()
        };
        let b = SimBackend::new(cfg).unwrap();
        let host = b.alloc_host(1000).unwrap();
        let dev = b.alloc_device(1000).unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&host, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        assert!((b.stream_clock(Stream::D2H) - 2e-6).abs() < 1e-18);
        let full = SimBackend::new(SimConfig {
            full_duplex: true,
            ..cfg
        })
        .unwrap();
        full.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        full.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&host, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        assert!((full.stream_clock(Stream::D2H) - 1e-6).abs() < 1e-18);
    }
}
