//! `adapter_config.json` parsing and PEFT's per-module rank / alpha lookup on arbitrary text.
#![no_main]

use intruder_gate::adapter::AdapterConfig;
use libfuzzer_sys::fuzz_target;

const MODULES: [&str; 4] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.mlp.down_proj",
    "encoder.layer.3.attention.self.value",
    "",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = AdapterConfig::parse(text) else {
        return;
    };
    assert!(config.r >= 1, "a parsed config has rank ≥ 1");
    for m in MODULES {
        let r = config.rank_for(m);
        assert!(r >= 1, "rank_for({m:?}) = 0");
        // Only finiteness is checked at load time; the lookup itself must not panic.
        let _ = config.alpha_for(m);
        let _ = config.scale_for(m);
    }
});
