//! The model provider's settings (`MAESTRA_LLM_*`) and the history window's character budget.
//!
//! No `MAESTRA_LLM_BASE_URL` means no provider: the offline responder answers. With one, the
//! model is required; the API key is optional (a local Ollama or llama.cpp needs none) and is
//! held as a secret that never shows in `Debug` output or logs.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, Raw, non_empty, parse_positive, required};
use crate::responder::pricing::Price;

#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `None`: the built-in offline responder.
    pub provider: Option<ProviderSettings>,
    /// At most this many characters of history go to the model (the newest message always goes).
    pub history_chars: usize,
}

/// An OpenAI-compatible chat-completions server.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// Used as given, without a trailing `/`: requests go to `{base_url}/chat/completions`,
    /// as the OpenAI SDKs do (so it usually ends in `/v1`).
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub model: String,
    pub system_prompt: String,
    pub connect_timeout: Duration,
    /// The whole budget for one reply: every attempt, backoff and the full stream.
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// USD per million tokens, by model name.
    pub prices: BTreeMap<String, Price>,
}

/// One row of the price table as written in a settings file.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct RawPrice {
    input: Option<String>,
    output: Option<String>,
}

/// Retries are for passing trouble; more than this only delays the error.
const MAX_RETRIES: u32 = 10;

pub(super) fn parse(raw: &Raw) -> Result<LlmSettings, ConfigError> {
    let history_chars = parse_positive(
        "MAESTRA_HISTORY_CHARS",
        &required("MAESTRA_HISTORY_CHARS", raw.history_chars.clone())?,
    )?;
    let base_url = non_empty(raw.llm_base_url.clone());
    let model = non_empty(raw.llm_model.clone());
    let api_key = raw
        .llm_api_key
        .clone()
        .filter(|key| !key.expose_secret().trim().is_empty());
    // It goes into a header; say what is wrong without repeating it.
    if let Some(key) = &api_key
        && !key
            .expose_secret()
            .trim()
            .bytes()
            .all(|b| b.is_ascii_graphic())
    {
        return Err(ConfigError::new(
            "MAESTRA_LLM_API_KEY",
            "must be printable ASCII without spaces (check for a stray space or line break)",
        ));
    }
    let api_key = api_key.map(|key| SecretString::from(key.expose_secret().trim()));
    let Some(base_url) = base_url else {
        if model.is_some() || api_key.is_some() {
            return Err(ConfigError::new(
                "MAESTRA_LLM_BASE_URL",
                "must be set when MAESTRA_LLM_MODEL or MAESTRA_LLM_API_KEY is (e.g. \
                 https://api.openai.com/v1, or http://127.0.0.1:11434/v1 for Ollama)",
            ));
        }
        return Ok(LlmSettings {
            provider: None,
            history_chars,
        });
    };
    let model = model.ok_or_else(|| {
        ConfigError::new(
            "MAESTRA_LLM_MODEL",
            "must be set when MAESTRA_LLM_BASE_URL is (e.g. gpt-4o-mini, llama3.1:8b)",
        )
    })?;
    let mut prices = parse_prices(raw.llm_prices.as_ref())?;
    if let Some(price) = parse_model_price(raw)? {
        prices.insert(model.trim().to_owned(), price);
    }
    let max_retries = match raw.llm_max_retries.as_deref().map(str::trim) {
        None | Some("") => 2,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_RETRIES)
            .ok_or_else(|| {
                ConfigError::new(
                    "MAESTRA_LLM_MAX_RETRIES",
                    format!("{text:?} is not a whole number from 0 to {MAX_RETRIES}"),
                )
            })?,
    };
    Ok(LlmSettings {
        provider: Some(ProviderSettings {
            base_url: parse_base_url(&base_url)?,
            api_key,
            model: model.trim().to_owned(),
            system_prompt: raw.llm_system_prompt.clone().unwrap_or_default(),
            connect_timeout: parse_seconds(
                "MAESTRA_LLM_CONNECT_TIMEOUT",
                &required(
                    "MAESTRA_LLM_CONNECT_TIMEOUT",
                    raw.llm_connect_timeout.clone(),
                )?,
            )?,
            request_timeout: parse_seconds(
                "MAESTRA_LLM_REQUEST_TIMEOUT",
                &required(
                    "MAESTRA_LLM_REQUEST_TIMEOUT",
                    raw.llm_request_timeout.clone(),
                )?,
            )?,
            max_retries,
            prices,
        }),
        history_chars,
    })
}

/// An http(s) URL without query or fragment; a trailing `/` is dropped.
fn parse_base_url(value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    let invalid = |why: &str| {
        ConfigError::new(
            "MAESTRA_LLM_BASE_URL",
            format!("{value:?} {why} (e.g. https://api.openai.com/v1)"),
        )
    };
    let url = Url::parse(value).map_err(|_| invalid("is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("is not an http:// or https:// URL"));
    }
    if url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(invalid("must not carry a query, fragment or credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A positive number of seconds, fractions allowed (`0.5`).
fn parse_seconds(variable: &str, value: &str) -> Result<Duration, ConfigError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            ConfigError::new(
                variable,
                format!("{value:?} is not a positive number of seconds"),
            )
        })
}

fn parse_prices(
    table: Option<&BTreeMap<String, RawPrice>>,
) -> Result<BTreeMap<String, Price>, ConfigError> {
    let mut prices = BTreeMap::new();
    for (model, row) in table.into_iter().flatten() {
        let variable = format!("llm_prices.\"{model}\"");
        let missing = |name: &str| ConfigError::new(&variable, format!("{name} price missing"));
        let input = row.input.as_deref().ok_or_else(|| missing("input"))?;
        let output = row.output.as_deref().ok_or_else(|| missing("output"))?;
        let price = Price::from_usd_per_million(input, output)
            .map_err(|problem| ConfigError::new(&variable, problem))?;
        prices.insert(model.clone(), price);
    }
    Ok(prices)
}

/// `MAESTRA_LLM_PRICE_INPUT` / `_OUTPUT`: the configured model's price, over the table's.
fn parse_model_price(raw: &Raw) -> Result<Option<Price>, ConfigError> {
    let input = non_empty(raw.llm_price_input.clone());
    let output = non_empty(raw.llm_price_output.clone());
    let (input, output) = match (input, output) {
        (None, None) => return Ok(None),
        (Some(input), Some(output)) => (input, output),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "MAESTRA_LLM_PRICE_OUTPUT",
                "must be set with MAESTRA_LLM_PRICE_INPUT",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "MAESTRA_LLM_PRICE_INPUT",
                "must be set with MAESTRA_LLM_PRICE_OUTPUT",
            ));
        }
    };
    let input = crate::responder::pricing::parse_usd_per_million(&input)
        .map_err(|p| ConfigError::new("MAESTRA_LLM_PRICE_INPUT", p))?;
    let output = crate::responder::pricing::parse_usd_per_million(&output)
        .map_err(|p| ConfigError::new("MAESTRA_LLM_PRICE_OUTPUT", p))?;
    Ok(Some(Price {
        input_pico_per_token: input,
        output_pico_per_token: output,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;
    use super::*;

    fn provider(vars: &[(&str, &str)]) -> ProviderSettings {
        load(vars).unwrap().llm.provider.expect("a provider")
    }

    const OLLAMA: [(&str, &str); 2] = [
        ("MAESTRA_LLM_BASE_URL", "http://127.0.0.1:11434/v1/"),
        ("MAESTRA_LLM_MODEL", "llama3.1:8b"),
    ];

    #[test]
    fn without_a_base_url_the_offline_responder_answers() {
        let settings = load(&[]).unwrap();
        assert!(settings.llm.provider.is_none());
        assert!(settings.llm.history_chars > 0);
    }

    #[test]
    fn a_provider_has_defaults_for_everything_but_its_url_and_model() {
        let provider = provider(&OLLAMA);
        assert_eq!(provider.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(provider.model, "llama3.1:8b");
        assert!(provider.api_key.is_none());
        assert!(provider.system_prompt.contains("Maestra"));
        assert_eq!(provider.connect_timeout, Duration::from_secs(5));
        assert_eq!(provider.request_timeout, Duration::from_secs(60));
        assert_eq!(provider.max_retries, 2);
        assert!(provider.prices.contains_key("gpt-4o-mini"));
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let mut vars = OLLAMA.to_vec();
        vars.push(("MAESTRA_LLM_API_KEY", "sk-very-secret-value"));
        let settings = load(&vars).unwrap();
        let key = settings.llm.provider.as_ref().unwrap().api_key.as_ref();
        assert_eq!(key.unwrap().expose_secret(), "sk-very-secret-value");
        assert!(!format!("{settings:?}").contains("very-secret"));
    }

    #[test]
    fn an_unusable_api_key_is_refused_without_being_repeated() {
        let mut vars = OLLAMA.to_vec();
        vars.push(("MAESTRA_LLM_API_KEY", "sk-secret with-space"));
        let err = load(&vars).unwrap_err();
        assert_eq!(err.variable, "MAESTRA_LLM_API_KEY");
        assert!(!err.to_string().contains("sk-secret"), "{err}");
    }

    #[test]
    fn each_bad_provider_value_names_its_variable() {
        let cases = [
            ("MAESTRA_LLM_BASE_URL", "not a url"),
            ("MAESTRA_LLM_BASE_URL", "ftp://example.com/v1"),
            ("MAESTRA_LLM_BASE_URL", "https://example.com/v1?x=1"),
            ("MAESTRA_LLM_CONNECT_TIMEOUT", "0"),
            ("MAESTRA_LLM_REQUEST_TIMEOUT", "soon"),
            ("MAESTRA_LLM_MAX_RETRIES", "-1"),
            ("MAESTRA_LLM_MAX_RETRIES", "99"),
            ("MAESTRA_LLM_PRICE_INPUT", "cheap"),
            ("MAESTRA_HISTORY_CHARS", "0"),
        ];
        for (variable, value) in cases {
            let mut vars = OLLAMA.to_vec();
            vars.push((variable, value));
            if variable == "MAESTRA_LLM_PRICE_INPUT" {
                vars.push(("MAESTRA_LLM_PRICE_OUTPUT", "1"));
            }
            let err = load(&vars).unwrap_err();
            assert_eq!(err.variable, variable, "{variable}={value}: {err}");
        }
    }

    #[test]
    fn a_model_without_a_base_url_is_an_error_rather_than_silently_offline() {
        let err = load(&[("MAESTRA_LLM_MODEL", "gpt-4o")]).unwrap_err();
        assert_eq!(err.variable, "MAESTRA_LLM_BASE_URL");
        let err = load(&[("MAESTRA_LLM_BASE_URL", "https://api.openai.com/v1")]).unwrap_err();
        assert_eq!(err.variable, "MAESTRA_LLM_MODEL");
    }

    #[test]
    fn the_environment_prices_the_configured_model() {
        let mut vars = OLLAMA.to_vec();
        vars.extend([
            ("MAESTRA_LLM_PRICE_INPUT", "0.5"),
            ("MAESTRA_LLM_PRICE_OUTPUT", "1.5"),
        ]);
        let provider = provider(&vars);
        assert_eq!(
            provider.prices["llama3.1:8b"],
            Price::from_usd_per_million("0.5", "1.5").unwrap()
        );
        let mut half = OLLAMA.to_vec();
        half.push(("MAESTRA_LLM_PRICE_INPUT", "0.5"));
        assert_eq!(
            load(&half).unwrap_err().variable,
            "MAESTRA_LLM_PRICE_OUTPUT"
        );
    }

    #[test]
    fn a_settings_file_adds_prices_for_models_with_dots_slashes_and_capitals() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("local.toml"),
            "llm_prices.\"meta-llama/Llama-3.1-8B-Instruct\" = { input = 0.05, output = 0.08 }\n\
             llm_prices.\"gpt-4o-mini\" = { input = 1, output = 2 }\n",
        )
        .unwrap();
        let mut vars = OLLAMA.to_vec();
        vars.push(("MAESTRA_CONFIG_DIR", dir.path().to_str().unwrap()));
        let prices = provider(&vars).prices;
        assert_eq!(
            prices["meta-llama/Llama-3.1-8B-Instruct"],
            Price::from_usd_per_million("0.05", "0.08").unwrap()
        );
        assert_eq!(
            prices["gpt-4o-mini"],
            Price::from_usd_per_million("1", "2").unwrap(),
            "a file overrides a built-in price"
        );
        assert!(prices.contains_key("gpt-4o"), "built-in prices are kept");
    }

    #[test]
    fn a_bad_price_in_a_file_names_the_model() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("local.toml"),
            "llm_prices.\"my-model\" = { input = \"lots\", output = 1 }\n",
        )
        .unwrap();
        let mut vars = OLLAMA.to_vec();
        vars.push(("MAESTRA_CONFIG_DIR", dir.path().to_str().unwrap()));
        let err = load(&vars).unwrap_err();
        assert_eq!(err.variable, "llm_prices.\"my-model\"");
    }
}
