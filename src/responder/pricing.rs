//! What a model call costs: a price table keyed by model name, in USD per million input
//! (prompt) and output (completion) tokens.
//!
//! Prices are held as whole pico-dollars (1e-12 USD) per token, parsed from their decimal text,
//! so a cost is an exact integer until it is turned into `cost_usd` once, at the edge: the same
//! token counts always cost the same, streamed or not, and sums over the ledger are exact.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

/// Pico-dollars per token for one USD per million tokens.
const PICO_PER_TOKEN_PER_USD_PER_MILLION: u64 = 1_000_000;
/// `USD per 1M tokens` keeps at most this many decimal places (one pico-dollar per token).
const MAX_DECIMALS: usize = 6;
const PICO_PER_USD: f64 = 1e12;

/// The price of one model, in pico-dollars per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_pico_per_token: u64,
    pub output_pico_per_token: u64,
}

impl Price {
    /// A price from its two figures in USD per million tokens, as decimal text (`"0.15"`).
    pub fn from_usd_per_million(input: &str, output: &str) -> Result<Self, String> {
        Ok(Self {
            input_pico_per_token: parse_usd_per_million(input)?,
            output_pico_per_token: parse_usd_per_million(output)?,
        })
    }

    /// The exact cost in pico-dollars.
    pub fn cost_pico(&self, prompt_tokens: u64, completion_tokens: u64) -> u128 {
        u128::from(prompt_tokens) * u128::from(self.input_pico_per_token)
            + u128::from(completion_tokens) * u128::from(self.output_pico_per_token)
    }
}

/// Pico-dollars per token from `USD per 1M tokens` written as a plain decimal (`"2.50"`).
pub fn parse_usd_per_million(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let invalid = || {
        format!(
            "{text:?} is not a price in USD per million tokens \
             (a number >= 0 with at most {MAX_DECIMALS} decimals, like 0.15)"
        )
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty()
        || !digits(whole)
        || !digits(fraction)
        || fraction.len() > MAX_DECIMALS
    {
        return Err(invalid());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let padded = format!("{fraction:0<MAX_DECIMALS$}");
    let fraction: u64 = padded.parse().map_err(|_| invalid())?;
    whole
        .checked_mul(PICO_PER_TOKEN_PER_USD_PER_MILLION)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(invalid)
}

/// USD from pico-dollars. Correctly rounded, so an exact decimal cost prints as itself.
pub fn pico_to_usd(pico: u128) -> f64 {
    pico as f64 / PICO_PER_USD
}

/// Pico-dollars from a `cost_usd` this module produced (exact below about 9,000 USD).
pub fn usd_to_pico(usd: f64) -> u128 {
    if usd.is_finite() && usd > 0.0 {
        (usd * PICO_PER_USD).round() as u128
    } else {
        0
    }
}

/// The configured prices, and the unknown models already warned about.
#[derive(Debug, Default)]
pub struct PriceTable {
    prices: BTreeMap<String, Price>,
    warned: Mutex<HashSet<String>>,
}

impl PriceTable {
    pub fn new(prices: BTreeMap<String, Price>) -> Self {
        Self {
            prices,
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The cost of a call in USD. The model is looked up by each name in turn (the configured
    /// name first, then the one the provider reported, which may carry a date suffix). An
    /// unknown model costs 0, and the first time each is seen a warning says so.
    pub fn cost_usd(&self, models: &[&str], prompt_tokens: u64, completion_tokens: u64) -> f64 {
        if let Some(price) = models.iter().find_map(|m| self.prices.get(*m)) {
            return pico_to_usd(price.cost_pico(prompt_tokens, completion_tokens));
        }
        if self.first_time_unknown(models.first().copied().unwrap_or_default()) {
            tracing::warn!(
                llm.model = models.first().copied().unwrap_or_default(),
                "no price for this model in the price table (llm_prices): its calls cost 0"
            );
        }
        0.0
    }

    /// True once per unknown model name.
    fn first_time_unknown(&self, model: &str) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        warned.insert(model.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_read_exactly_from_their_decimal_text() {
        assert_eq!(parse_usd_per_million("0.15"), Ok(150_000));
        assert_eq!(parse_usd_per_million("2.5"), Ok(2_500_000));
        assert_eq!(parse_usd_per_million("10"), Ok(10_000_000));
        assert_eq!(parse_usd_per_million(".5"), Ok(500_000));
        assert_eq!(parse_usd_per_million("0"), Ok(0));
        assert_eq!(parse_usd_per_million("0.000001"), Ok(1));
    }

    #[test]
    fn a_price_that_is_not_a_plain_decimal_is_refused() {
        for bad in [
            "",
            ".",
            "-1",
            "1e-3",
            "abc",
            "1.2.3",
            "0.0000001",
            "NaN",
            "1,5",
        ] {
            assert!(parse_usd_per_million(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_cost_is_tokens_times_the_price_per_million() {
        let price = Price::from_usd_per_million("2.5", "10").unwrap();
        // 1200 * 2.5 / 1e6 + 340 * 10 / 1e6
        assert_eq!(pico_to_usd(price.cost_pico(1200, 340)), 0.0064);
        let mini = Price::from_usd_per_million("0.15", "0.6").unwrap();
        assert_eq!(pico_to_usd(mini.cost_pico(1, 1)), 0.00000075);
    }

    #[test]
    fn a_cost_survives_the_round_trip_through_usd() {
        let price = Price::from_usd_per_million("0.15", "0.6").unwrap();
        for (p, c) in [(0, 0), (1, 1), (123_456, 7_890), (10_000_000, 2_000_000)] {
            let pico = price.cost_pico(p, c);
            assert_eq!(usd_to_pico(pico_to_usd(pico)), pico, "{p}/{c}");
        }
    }

    #[test]
    fn the_configured_name_is_tried_before_the_reported_one() {
        let table = PriceTable::new(BTreeMap::from([
            (
                "gpt-4o".to_owned(),
                Price::from_usd_per_million("2.5", "10").unwrap(),
            ),
            (
                "gpt-4o-2024-08-06".to_owned(),
                Price::from_usd_per_million("5", "15").unwrap(),
            ),
        ]));
        assert_eq!(
            table.cost_usd(&["gpt-4o", "gpt-4o-2024-08-06"], 1_000_000, 0),
            2.5
        );
        assert_eq!(
            table.cost_usd(&["other", "gpt-4o-2024-08-06"], 1_000_000, 0),
            5.0
        );
    }

    #[test]
    fn an_unknown_model_costs_nothing_and_is_reported_once() {
        let table = PriceTable::default();
        assert_eq!(table.cost_usd(&["mystery"], 1000, 1000), 0.0);
        assert!(!table.first_time_unknown("mystery"), "warned twice");
        assert!(table.first_time_unknown("another"));
    }
}
