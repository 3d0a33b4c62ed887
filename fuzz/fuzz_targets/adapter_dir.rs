//! A PEFT adapter directory end to end: the input is split into `adapter_config.json` and
//! `adapter_model.safetensors` (see `split_adapter_input`), written to a directory and screened
//! with `Gate::load_and_screen` against a small synthetic base (config, weights, name mapping,
//! shape checks, the Brand update, the policy). A report must be sound (`check_report`); one
//! with intruders is clamped (or refused because its dtype cannot hold the clamped factors), and
//! the clamped adapter must screen again.
#![no_main]

use intruder_gate::clamp::clamp;
use intruder_gate::{ClampOptions, ErrorKind};
use intruder_gate_fuzz::{check_report, gate, scratch, split_adapter_input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((config, weights)) = split_adapter_input(data) else {
        return;
    };
    let gate = gate();
    let dir = scratch().join("adapter");
    std::fs::create_dir_all(&dir).expect("adapter dir");
    std::fs::write(dir.join("adapter_config.json"), config).expect("write config");
    std::fs::write(dir.join("adapter_model.safetensors"), weights).expect("write weights");
    let Ok((report, adapter)) = gate.load_and_screen(&dir) else {
        return;
    };
    check_report(&report);
    let Some(adapter) = adapter.filter(|_| report.total_intruders > 0) else {
        return;
    };
    let clamped = match clamp(gate, &adapter, &report, &ClampOptions::default()) {
        Ok(c) => c,
        // Clamped factors the adapter's own dtype cannot hold are refused by name.
        Err(e) if e.kind() == ErrorKind::Limit && e.message().contains("do not fit") => return,
        Err(e) => panic!("an adapter that screened clamps: {e:?}"),
    };
    let again = match clamped.to_adapter(clamped.dtype, None) {
        Ok(a) => a,
        // The gate's bound ‖B''‖·‖A''‖ on the clamped update can exceed max_norm where the
        // source's did not (a huge B column beside unit intruder rows): a clear Limit error.
        Err(e) if e.kind() == ErrorKind::Limit && e.message().contains("max_norm") => return,
        Err(e) => panic!("clamped factors form an adapter: {e:?}"),
    };
    let after = gate.screen(&again).expect("a clamped adapter screens");
    check_report(&after);
    assert_eq!(after.modules.len(), report.modules.len());
});
