//! `tally prices import`: LiteLLM's `model_prices_and_context_window.json` as tally prices.
//!
//! Each entry with both `input_cost_per_token` and `output_cost_per_token` (USD per token)
//! becomes a price of the same model name; `cache_read_input_token_cost`,
//! `cache_creation_input_token_cost` and `output_cost_per_reasoning_token` fill the other
//! kinds when present. Prices are converted exactly to femto-USD per token (15 decimal
//! places; finer ones are rounded), and sent as USD per million tokens, which the node
//! reads back exactly.
//! Tiered prices (`*_above_128k_tokens`) and non-token prices (per image, per second)
//! are not expressed: the base per-token prices apply.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tally_api::{PriceBatchRequest, PriceEntry, PricesWritten};
use tally_core::prices::{femto_to_per_mtok, per_token_to_femto, validate_model};

use crate::cli::ClientOpts;
use crate::client::{Http, Method, Request};
use crate::http::PRICE_BATCH_MAX;

/// What an import file holds: the prices to write, and what was skipped and why.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub prices: Vec<PriceEntry>,
    /// (model, reason).
    pub skipped: Vec<(String, String)>,
}

/// Reads LiteLLM's price file. `providers` (when not empty) keeps only those
/// `litellm_provider` values.
pub fn parse_litellm(text: &str, providers: &[String]) -> anyhow::Result<Parsed> {
    let v: Value = serde_json::from_str(text).context("the price file is not JSON")?;
    let Value::Object(models) = v else {
        bail!("the price file must be a JSON object of model name → prices");
    };
    let mut out = Parsed::default();
    for (model, entry) in models {
        if model == "sample_spec" {
            continue; // LiteLLM's documentation entry
        }
        if !providers.is_empty() {
            let p = entry.get("litellm_provider").and_then(Value::as_str);
            if !p.is_some_and(|p| providers.iter().any(|q| q == p)) {
                continue;
            }
        }
        match entry_price(&model, &entry) {
            Ok(p) => out.prices.push(p),
            Err(reason) => out.skipped.push((model, reason)),
        }
    }
    out.prices.sort_by(|a, b| a.model.cmp(&b.model));
    Ok(out)
}

fn entry_price(model: &str, entry: &Value) -> Result<PriceEntry, String> {
    validate_model(model).map_err(|e| e.to_string())?;
    let field = |name: &str| -> Result<Option<f64>, String> {
        match entry.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let usd = v
                    .as_f64()
                    .ok_or_else(|| format!("{name} is not a number: {v}"))?;
                let femto = per_token_to_femto(usd).map_err(|e| format!("{name}: {e}"))?;
                Ok(Some(femto_to_per_mtok(femto)))
            }
        }
    };
    let (Some(input), Some(output)) = (
        field("input_cost_per_token")?,
        field("output_cost_per_token")?,
    ) else {
        return Err("no input_cost_per_token and output_cost_per_token".into());
    };
    Ok(PriceEntry {
        model: model.to_string(),
        input,
        output,
        cache_read: field("cache_read_input_token_cost")?,
        cache_creation: field("cache_creation_input_token_cost")?,
        reasoning: field("output_cost_per_reasoning_token")?,
    })
}

/// `tally prices import FILE`.
pub fn import_cli(
    opts: &ClientOpts,
    file: &Path,
    providers: &[String],
    dry_run: bool,
) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
        t
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let parsed = parse_litellm(&text, providers)?;
    let mut written = 0;
    if !dry_run {
        let http = Http::new(opts)?;
        for chunk in parsed.prices.chunks(PRICE_BATCH_MAX) {
            let body = PriceBatchRequest {
                prices: chunk.to_vec(),
            };
            let reply = http.send(&Request {
                method: Method::Post,
                path: "/v1/prices/batch".to_owned(),
                body: Some(serde_json::to_value(&body)?),
            })?;
            if !reply.is_success() {
                return Err(reply.error().context(format!(
                    "{written} prices were written before this batch failed"
                )));
            }
            let w: PricesWritten = serde_json::from_value(reply.body)?;
            written += w.written;
        }
    }
    if opts.json {
        let skipped: Vec<Value> = parsed
            .skipped
            .iter()
            .map(|(m, r)| serde_json::json!({"model": m, "reason": r}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": dry_run,
                "prices": parsed.prices.len(),
                "written": written,
                "skipped": skipped,
            }))?
        );
    } else {
        let verb = if dry_run { "would import" } else { "imported" };
        println!(
            "{verb} {} prices; skipped {} entries (no input and output price per token, a price that is not a number, or a name over 128 bytes; --json lists them)",
            parsed.prices.len(),
            parsed.skipped.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn litellm_entries_become_exact_prices() {
        let text = r#"{
            "sample_spec": {"input_cost_per_token": 0.0},
            "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                       "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai",
                       "input_cost_per_token_above_128k_tokens": 5e-06},
            "o1": {"input_cost_per_token": 1.5e-05, "output_cost_per_token": 6e-05,
                   "output_cost_per_reasoning_token": 6e-05, "litellm_provider": "openai"},
            "claude-3-haiku-20240307": {"input_cost_per_token": 2.5e-07, "output_cost_per_token": 1.25e-06,
                   "cache_creation_input_token_cost": 3e-07, "cache_read_input_token_cost": 3e-08,
                   "litellm_provider": "anthropic"},
            "dall-e-3": {"output_cost_per_image": 0.04, "litellm_provider": "openai"},
            "tiny": {"input_cost_per_token": 1.6e-15, "output_cost_per_token": 0.0, "litellm_provider": "x"},
            "weird": {"input_cost_per_token": "free", "output_cost_per_token": 0.0, "litellm_provider": "x"}
        }"#;
        let p = parse_litellm(text, &[]).unwrap();
        let models: Vec<&str> = p.prices.iter().map(|e| e.model.as_str()).collect();
        assert_eq!(models, ["claude-3-haiku-20240307", "gpt-4o", "o1", "tiny"]);
        assert_eq!(p.prices[3].input, 0.000000002, "1.6 femto-USD rounds to 2");
        assert_eq!(
            p.prices[1],
            PriceEntry {
                model: "gpt-4o".into(),
                input: 2.5,
                output: 10.0,
                cache_read: Some(1.25),
                cache_creation: None,
                reasoning: None,
            }
        );
        assert_eq!(p.prices[0].cache_read, Some(0.03));
        assert_eq!(p.prices[0].cache_creation, Some(0.3));
        let skipped: Vec<&str> = p.skipped.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(skipped, ["dall-e-3", "weird"]);
        assert!(
            p.skipped[1].1.contains("not a number"),
            "{:?}",
            p.skipped[1]
        );
        let only = parse_litellm(text, &["anthropic".into()]).unwrap();
        assert_eq!(only.prices.len(), 1);
        assert!(parse_litellm("[]", &[]).is_err());
    }
}
