//! Seeded chat-like requests: Poisson arrivals, log-normal prompt and output
//! lengths.
//!
//! The lengths follow the shape of ShareGPT conversations as serving papers
//! use them (vLLM, Orca, Pie): a prompt of a few hundred tokens with a long
//! tail, an answer of a similar size. Here both are log-normal, prompts with a
//! median of 200 tokens (sigma 0.9, clipped to 8..=2048), outputs with a median
//! of 180 tokens (sigma 0.8, clipped to 4..=1024): mean prompt about 290 and
//! mean output about 245 tokens. The generator is a SplitMix64 stream, so a
//! seed gives the same requests on every machine and every run.

/// One request as the client sends it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// Index in arrival order.
    pub id: usize,
    /// Arrival time, seconds from the start of the run.
    pub arrival: f64,
    /// Prompt tokens.
    pub prompt: usize,
    /// Tokens to generate (the request finishes after exactly this many).
    pub output: usize,
}

impl Request {
    /// Tokens of KV the request holds when it finishes (its last generated
    /// token is never fed back, so it has no KV).
    pub fn max_kv_tokens(&self) -> usize {
        self.prompt + self.output - 1
    }
}

/// Median, log-space sigma and bounds of the prompt lengths.
pub const PROMPT_LENGTHS: (f64, f64, usize, usize) = (200.0, 0.9, 8, 2048);
/// Median, log-space sigma and bounds of the output lengths.
pub const OUTPUT_LENGTHS: (f64, f64, usize, usize) = (180.0, 0.8, 4, 1024);

/// SplitMix64 (Steele, Lea and Flood, 2014): small, fast and good enough for
/// workload generation; never used for anything secret.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): never 0, so its logarithm is finite.
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let (u, v) = (self.next_open01(), self.next_open01());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn lognormal(rng: &mut SplitMix64, (median, sigma, lo, hi): (f64, f64, usize, usize)) -> usize {
    let x = median * (sigma * rng.next_normal()).exp();
    (x.round() as usize).clamp(lo, hi)
}

/// `n` chat-like requests arriving as a Poisson process of `rate` requests per
/// second (`f64::INFINITY`: all at time 0, an offline batch), from `seed`.
pub fn chat_requests(n: usize, rate: f64, seed: u64) -> Vec<Request> {
    let mut rng = SplitMix64::new(seed);
    let mut t = 0.0;
    (0..n)
        .map(|id| {
            if rate.is_finite() && id > 0 {
                t += -rng.next_open01().ln() / rate;
            }
            let prompt = lognormal(&mut rng, PROMPT_LENGTHS);
            let output = lognormal(&mut rng, OUTPUT_LENGTHS);
            Request {
                id,
                arrival: t,
                prompt,
                output,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_requests_are_reproducible_and_chat_like() {
        let a = chat_requests(2000, 4.0, 7);
        assert_eq!(a, chat_requests(2000, 4.0, 7));
        assert_ne!(a, chat_requests(2000, 4.0, 8));
        let mean = |f: &dyn Fn(&Request) -> f64| a.iter().map(f).sum::<f64>() / a.len() as f64;
        let prompt = mean(&|r| r.prompt as f64);
        let output = mean(&|r| r.output as f64);
        assert!((240.0..340.0).contains(&prompt), "{prompt}");
        assert!((200.0..290.0).contains(&output), "{output}");
        // Poisson arrivals: the mean gap is 1/rate.
        let gap = a.last().unwrap().arrival / (a.len() - 1) as f64;
        assert!((gap - 0.25).abs() < 0.02, "{gap}");
        assert!(a.windows(2).all(|w| w[0].arrival <= w[1].arrival));
        assert!(chat_requests(10, f64::INFINITY, 1)
            .iter()
            .all(|r| r.arrival == 0.0));
    }
}
