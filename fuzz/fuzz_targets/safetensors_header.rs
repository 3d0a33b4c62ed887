//! The safetensors reader (header, limits, offsets) on arbitrary bytes. Whatever it accepts must
//! agree with the reference parser, decode to the declared number of elements, and survive the
//! writer → reader round trip unchanged.
#![no_main]

use intruder_gate::safetensors_file::{self, SafetensorsFile};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let dir = intruder_gate_fuzz::scratch();
    let path = dir.join("input.safetensors");
    std::fs::write(&path, data).expect("write the input");
    let limits = intruder_gate_fuzz::limits();
    let Ok(file) = SafetensorsFile::open(&path, &limits) else {
        return;
    };
    let reference =
        safetensors::SafeTensors::deserialize(data).expect("accepted by ours, so by the reference");
    let mut names: Vec<&str> = file.names().collect();
    let mut ref_names: Vec<&str> = reference.names();
    names.sort_unstable();
    ref_names.sort_unstable();
    assert_eq!(
        names, ref_names,
        "tensor names differ from the reference parser"
    );

    let mut tensors = Vec::new();
    for name in &names {
        let info = file.info(name).expect("listed name has info");
        let view = reference.tensor(name).expect("reference has it");
        assert_eq!(
            info.shape,
            view.shape(),
            "{name}: shape differs from the reference"
        );
        let bytes = file.bytes(name).expect("listed name has bytes");
        assert_eq!(
            bytes,
            view.data(),
            "{name}: data differs from the reference"
        );
        if let Ok(t) = file.matrix(name) {
            assert_eq!(t.to_f32().len(), t.rows * t.cols, "{name}: decoded length");
        }
        if let Some(dtype) = info.dtype {
            tensors.push((name.to_string(), dtype, info.shape.clone(), bytes.to_vec()));
        }
    }
    // Round trip through our writer: same tensors, same bytes, same metadata.
    let out = dir.join("roundtrip.safetensors");
    let metadata: BTreeMap<String, String> = file.metadata().clone();
    safetensors_file::write(&out, &tensors, &metadata).expect("write what was read");
    let again = SafetensorsFile::open(&out, &limits).expect("read what was written");
    assert_eq!(
        again.metadata(),
        &metadata,
        "metadata changed in the round trip"
    );
    for (name, dtype, shape, bytes) in &tensors {
        let info = again.info(name).expect("written tensor is there");
        assert_eq!((info.dtype, &info.shape), (Some(*dtype), shape), "{name}");
        assert_eq!(
            again.bytes(name),
            Some(bytes.as_slice()),
            "{name}: bytes changed"
        );
    }
    assert_eq!(
        again.names().count(),
        tensors.len(),
        "extra tensors after the round trip"
    );
});
