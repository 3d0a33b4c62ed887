// A vLLM-style LoRA adapter registry over the intruder-gate C API.
//
//   adapter_registry [--merge] BASE  < commands
//
// Commands on stdin, one per line:  load NAME DIR | unload NAME | list
// Every adapter is screened before it is activated; rejected ones are refused with the reason.
// Accepted adapters keep their factors unmerged (ΔW = scale·B·A applied at serving time, as
// vLLM, SGLang and LoRAX do), or with --merge are added into the registry's own copy of the
// base weights (and subtracted again on unload).
#include <algorithm>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "intruder_gate.h"

namespace ig {

struct Error : std::runtime_error {
  ig_status status;
  Error(ig_status s, const std::string &what) : std::runtime_error(what), status(s) {}
};

std::string last_error() {
  std::string msg(ig_last_error(nullptr, 0), '\0');
  ig_last_error(msg.data(), msg.size());
  msg.pop_back();  // the NUL
  return msg;
}

void check(ig_status s, const char *what) {
  if (s != IG_STATUS_OK) throw Error(s, std::string(what) + ": " + ig_status_str(s) + ": " + last_error());
}

template <typename T, void (*Free)(T *)>
struct Deleter {
  void operator()(T *p) const { Free(p); }
};
template <typename T, void (*Free)(T *)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;

// One module's factors in the host's own memory: A [rank, in], B [out, rank], row-major f32.
struct Factors {
  std::string base_tensor;
  size_t rank, in, out;
  float scale;
  std::vector<float> a, b;
};

class Report {
 public:
  explicit Report(ig_report *r) : r_(r) {}
  ig_verdict verdict() const { return ig_report_verdict(r_.get()); }
  uint32_t total_intruders() const { return ig_report_total_intruders(r_.get()); }
  std::vector<ig_module_summary> modules() const {
    std::vector<ig_module_summary> out(ig_report_module_count(r_.get()));
    for (size_t i = 0; i < out.size(); ++i) check(ig_report_module(r_.get(), i, &out[i]), "report module");
    return out;
  }

 private:
  Handle<ig_report, ig_report_free> r_;
};

// Host-built adapter: the factors are copied into the library for screening.
class Adapter {
 public:
  explicit Adapter(const std::vector<Factors> &modules) : a_(ig_adapter_new()) {
    if (!a_) throw Error(IG_STATUS_INTERNAL, "ig_adapter_new failed");
    for (const auto &m : modules)
      check(ig_adapter_add_module(a_.get(), m.base_tensor.c_str(), m.a.data(), m.b.data(), IG_DTYPE_F32,
                                  m.rank, m.in, m.out, m.scale),
            "adding a module");
  }
  const ig_adapter *get() const { return a_.get(); }

 private:
  Handle<ig_adapter, ig_adapter_free> a_;
};

// Stands in for a server's own checkpoint loader: reads a PEFT directory into host memory.
std::vector<Factors> read_peft(const std::string &dir) {
  ig_adapter *raw = nullptr;
  check(ig_adapter_load_peft(dir.c_str(), &raw), "reading the adapter");
  Handle<ig_adapter, ig_adapter_free> a(raw);
  std::vector<Factors> out;
  for (size_t i = 0; i < ig_adapter_module_count(a.get()); ++i) {
    ig_lora_factors f;
    check(ig_adapter_module(a.get(), i, &f), "reading a module");
    out.push_back({std::string(f.name) + ".weight", f.rank, f.in_features, f.out_features, f.scale,
                   {f.lora_a, f.lora_a + f.rank * f.in_features},
                   {f.lora_b, f.lora_b + f.out_features * f.rank}});
  }
  return out;
}

class Gate {
 public:
  explicit Gate(const std::string &base) {
    ig_gate *raw = nullptr;
    check(ig_gate_new(nullptr, &raw), "creating the gate");
    g_.reset(raw);
    check(ig_gate_attach_base(g_.get(), base.c_str()), "attaching the base");
  }
  Report screen(const Adapter &a) {
    ig_report *r = nullptr;
    check(ig_gate_screen(g_.get(), a.get(), &r), "screening");
    return Report(r);
  }
  std::vector<float> base_tensor(const std::string &name, size_t &rows, size_t &cols) const {
    ig_gate_copy_base_tensor(g_.get(), name.c_str(), nullptr, 0, &rows, &cols);  // asks the size
    std::vector<float> w(rows * cols);
    check(ig_gate_copy_base_tensor(g_.get(), name.c_str(), w.data(), w.size(), &rows, &cols),
          "copying a base tensor");
    return w;
  }

 private:
  Handle<ig_gate, ig_gate_free> g_;
};

}  // namespace ig

const char *verdict_name(ig_verdict v) {
  switch (v) {
    case IG_VERDICT_ACCEPT: return "accept";
    case IG_VERDICT_WARN: return "warn";
    case IG_VERDICT_CLAMP: return "clamp";
    case IG_VERDICT_REJECT: return "reject";
    default: return "invalid";
  }
}

class Registry {
 public:
  Registry(const std::string &base, bool merge) : gate_(base), merge_(merge) {}

  void load(const std::string &name, const std::string &dir) {
    if (active_.count(name)) throw std::runtime_error("an adapter named " + name + " is already loaded");
    std::vector<ig::Factors> factors = ig::read_peft(dir);
    ig::Report report = gate_.screen(ig::Adapter(factors));
    const ig_verdict verdict = report.verdict();
    switch (verdict) {
      case IG_VERDICT_ACCEPT:
      case IG_VERDICT_WARN:
        break;
      case IG_VERDICT_CLAMP:
        // CLAMP HOOK: once the policy branch lands, replace `factors` here with the clamped
        // factors it produces (intruder directions damped) and fall through to activation.
        std::cout << "refused " << name << ": verdict clamp, and this registry has no clamped factors yet\n";
        return;
      default:
        std::cout << "refused " << name << ": verdict " << verdict_name(verdict) << " ("
                  << report.total_intruders() << " intruder dimensions" << worst_module(report) << ")\n";
        return;
    }
    // Module name -> base tensor, as the gate mapped it.
    std::map<std::string, std::string> target;
    for (const auto &m : report.modules()) target[std::string(m.name) + ".weight"] = m.base_tensor;
    for (auto &f : factors) f.base_tensor = target.at(f.base_tensor);
    if (merge_) apply(factors, +1.0f);
    std::cout << "loaded " << name << ": verdict " << verdict_name(verdict) << ", " << factors.size()
              << " modules, " << report.total_intruders() << " intruder dimensions"
              << (merge_ ? ", merged" : ", unmerged") << "\n";
    active_.emplace(name, Entry{dir, verdict, report.total_intruders(), std::move(factors)});
  }

  void unload(const std::string &name) {
    auto it = active_.find(name);
    if (it == active_.end()) throw std::runtime_error("no adapter named " + name);
    if (merge_) apply(it->second.factors, -1.0f);
    active_.erase(it);
    std::cout << "unloaded " << name << "\n";
  }

  void list() const {
    std::cout << active_.size() << " active\n";
    for (const auto &[name, e] : active_)
      std::cout << "  " << name << " " << verdict_name(e.verdict) << " " << e.intruders << " intruders "
                << e.factors.size() << " modules " << e.dir << "\n";
  }

 private:
  struct Weight {
    size_t rows, cols;
    std::vector<float> w;
  };
  struct Entry {
    std::string dir;
    ig_verdict verdict;
    uint32_t intruders;
    std::vector<ig::Factors> factors;
  };

  static std::string worst_module(const ig::Report &r) {
    const auto modules = r.modules();
    const auto worst = std::max_element(modules.begin(), modules.end(),
                                        [](const auto &x, const auto &y) { return x.intruders < y.intruders; });
    return worst == modules.end() ? std::string() : std::string("; most in ") + worst->name;
  }

  // W += sign · scale · B·A on the registry's own copy of each base tensor.
  void apply(const std::vector<ig::Factors> &factors, float sign) {
    for (const auto &f : factors) {
      auto it = merged_.find(f.base_tensor);
      if (it == merged_.end()) {
        Weight w;
        w.w = gate_.base_tensor(f.base_tensor, w.rows, w.cols);
        it = merged_.emplace(f.base_tensor, std::move(w)).first;
      }
      std::vector<float> &w = it->second.w;
      for (size_t i = 0; i < f.out; ++i)
        for (size_t r = 0; r < f.rank; ++r) {
          const float bir = sign * f.scale * f.b[i * f.rank + r];
          for (size_t j = 0; j < f.in; ++j) w[i * f.in + j] += bir * f.a[r * f.in + j];
        }
    }
  }

  ig::Gate gate_;
  bool merge_;
  std::map<std::string, Entry> active_;
  std::map<std::string, Weight> merged_;
};

int main(int argc, char **argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const bool merge = !args.empty() && args[0] == "--merge";
  if (merge) args.erase(args.begin());
  if (args.size() != 1) {
    std::cerr << "usage: " << argv[0] << " [--merge] BASE  < commands (load NAME DIR | unload NAME | list)\n";
    return 2;
  }
  try {
    Registry registry(args[0], merge);
    std::string line;
    while (std::getline(std::cin, line)) {
      std::istringstream in(line);
      std::string cmd, name, dir;
      in >> cmd >> name >> dir;
      try {
        if (cmd == "load" && !name.empty() && !dir.empty()) registry.load(name, dir);
        else if (cmd == "unload" && !name.empty()) registry.unload(name);
        else if (cmd == "list") registry.list();
        else if (!cmd.empty()) std::cout << "error: unknown command: " << line << "\n";
      } catch (const std::exception &e) {
        std::cout << "error: " << e.what() << "\n";
      }
    }
  } catch (const std::exception &e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
