// A vLLM-style LoRA adapter registry over the intruder-gate C API.
//
//   adapter_registry [--merge] [--metrics-port PORT] [--policy FILE] [--lambda L] BASE  < commands
//
// Commands on stdin, one per line:  load NAME DIR | unload NAME | list
// Every adapter is screened before it is activated, under the gate's default policy or the
// policy document in FILE (the JSON of `intruder-gate scan --policy`). Rejected ones are refused
// with the reason. Adapters with verdict clamp are activated clamped: the gate scales each
// intruder singular value by L (default 0.75) and the registry serves those factors instead.
// Active adapters keep their factors unmerged (ΔW = scale·B·A applied at serving time, as
// vLLM, SGLang and LoRAX do), or with --merge are added into the registry's own copy of the
// base weights (and subtracted again on unload).
// With --metrics-port, GET http://127.0.0.1:PORT/metrics serves the gate's Prometheus metrics
// while commands are read (PORT 0 picks a free port; the port is printed on stderr). Every
// screening is also logged to stderr through the gate's event callback.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <fstream>
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
  const ig_report *get() const { return r_.get(); }
  ig_verdict verdict() const { return ig_report_verdict(r_.get()); }
  uint32_t total_intruders() const { return ig_report_total_intruders(r_.get()); }
  std::vector<ig_module_summary> modules() const {
    std::vector<ig_module_summary> out(ig_report_module_count(r_.get()));
    for (size_t i = 0; i < out.size(); ++i) check(ig_report_module(r_.get(), i, &out[i]), "report module");
    return out;
  }
  // Why the verdict is what it is: the error, or the policy rules that fired.
  std::string reason() const {
    size_t needed = 0;
    ig_report_reason(r_.get(), nullptr, 0, &needed);  // asks for the size
    std::string out(needed, '\0');
    check(ig_report_reason(r_.get(), out.data(), out.size(), &needed), "report reason");
    out.resize(needed - 1);
    return out;
  }

 private:
  Handle<ig_report, ig_report_free> r_;
};

// Host-built adapter: the factors are copied into the library for screening.
class Adapter {
 public:
  Adapter(const std::string &name, const std::vector<Factors> &modules) : a_(ig_adapter_new()) {
    if (!a_) throw Error(IG_STATUS_INTERNAL, "ig_adapter_new failed");
    check(ig_adapter_set_name(a_.get(), name.c_str()), "naming the adapter");
    for (const auto &m : modules)
      check(ig_adapter_add_module(a_.get(), m.base_tensor.c_str(), m.a.data(), m.b.data(), IG_DTYPE_F32,
                                  m.rank, m.in, m.out, m.scale),
            "adding a module");
  }
  const ig_adapter *get() const { return a_.get(); }

 private:
  Handle<ig_adapter, ig_adapter_free> a_;
};

// Copies every module's factors out of a library-owned adapter into host memory.
std::vector<Factors> copy_factors(const ig_adapter *a) {
  std::vector<Factors> out;
  for (size_t i = 0; i < ig_adapter_module_count(a); ++i) {
    ig_lora_factors f;
    check(ig_adapter_module(a, i, &f), "reading a module");
    out.push_back({std::string(f.name) + ".weight", f.rank, f.in_features, f.out_features, f.scale,
                   {f.lora_a, f.lora_a + f.rank * f.in_features},
                   {f.lora_b, f.lora_b + f.out_features * f.rank}});
  }
  return out;
}

// Stands in for a server's own checkpoint loader: reads a PEFT directory into host memory.
std::vector<Factors> read_peft(const std::string &dir) {
  ig_adapter *raw = nullptr;
  check(ig_adapter_load_peft(dir.c_str(), &raw), "reading the adapter");
  Handle<ig_adapter, ig_adapter_free> a(raw);
  return copy_factors(a.get());
}

class Gate {
 public:
  // `policy_json` empty: the default policy.
  Gate(const std::string &base, const std::string &policy_json) {
    Handle<ig_config, ig_config_free> config(ig_config_new());
    if (!config) throw Error(IG_STATUS_INTERNAL, "ig_config_new failed");
    if (!policy_json.empty())
      check(ig_config_set_policy_json(config.get(), policy_json.c_str()), "setting the policy");
    ig_gate *raw = nullptr;
    check(ig_gate_new(config.get(), &raw), "creating the gate");
    g_.reset(raw);
    check(ig_gate_attach_base(g_.get(), base.c_str()), "attaching the base");
  }
  Report screen(const Adapter &a) {
    ig_report *r = nullptr;
    check(ig_gate_screen(g_.get(), a.get(), &r), "screening");
    return Report(r);
  }
  // The adapter `r` was screened from, with every intruder singular value scaled by `lambda`.
  // Exact mode: a module with m intruders comes back with rank r + m and scale 1, and nothing
  // but the intruders changes.
  std::vector<Factors> clamp(const Report &r, double lambda) {
    ig_adapter *raw = nullptr;
    check(ig_gate_clamp(g_.get(), r.get(), lambda, IG_CLAMP_TARGET_ALL, IG_CLAMP_MODE_EXACT, 0, &raw), "clamping");
    Handle<ig_adapter, ig_adapter_free> clamped(raw);
    return copy_factors(clamped.get());
  }
  // Prometheus text; retried because it may grow between asking the size and copying it.
  std::string metrics() const {
    std::string text(4096, '\0');
    size_t needed = 0;
    ig_status s;
    while ((s = ig_gate_metrics(g_.get(), text.data(), text.size(), &needed)) == IG_STATUS_BUFFER_TOO_SMALL)
      text.resize(needed);
    check(s, "reading the metrics");
    text.resize(needed - 1);  // the NUL
    return text;
  }
  // `cb` runs on the screening thread, after each screening (here: this one thread).
  void on_event(ig_event_callback cb, void *user_data) {
    check(ig_gate_set_event_callback(g_.get(), cb, user_data), "setting the event callback");
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

std::string read_file(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (!(in && text << in.rdbuf())) throw std::runtime_error("cannot read " + path);
  return text.str();
}

}  // namespace ig

const char *verdict_name(ig_verdict v) {
  switch (v) {
    case IG_VERDICT_ACCEPT: return "accept";
    case IG_VERDICT_WARN: return "warn";
    case IG_VERDICT_CLAMP: return "clamp";
    case IG_VERDICT_REJECT: return "reject";
    case IG_VERDICT_ERROR: return "error";
    default: return "invalid";
  }
}

class Registry {
 public:
  Registry(const std::string &base, const std::string &policy_json, double lambda, bool merge)
      : gate_(base, policy_json), lambda_(lambda), merge_(merge) {
    gate_.on_event(&Registry::log_event, &events_);
  }

  std::string metrics() const { return gate_.metrics(); }

  void load(const std::string &name, const std::string &dir) {
    if (active_.count(name)) throw std::runtime_error("an adapter named " + name + " is already loaded");
    std::vector<ig::Factors> factors = ig::read_peft(dir);
    ig::Report report = gate_.screen(ig::Adapter(name, factors));
    const ig_verdict verdict = report.verdict();
    std::string clamped;
    switch (verdict) {
      case IG_VERDICT_ACCEPT:
      case IG_VERDICT_WARN:
        break;
      case IG_VERDICT_CLAMP: {
        // Serve the clamped factors instead of the adapter's own.
        std::vector<ig::Factors> damped = gate_.clamp(report, lambda_);
        clamped = ", " + clamp_summary(factors, damped);
        factors = std::move(damped);
        break;
      }
      default:
        std::cout << "refused " << name << ": verdict " << verdict_name(verdict) << " ("
                  << report.total_intruders() << " intruder dimensions" << worst_module(report)
                  << "): " << report.reason() << "\n";
        return;
    }
    // Module name -> base tensor, as the gate mapped it.
    std::map<std::string, std::string> target;
    for (const auto &m : report.modules()) target[std::string(m.name) + ".weight"] = m.base_tensor;
    for (auto &f : factors) f.base_tensor = target.at(f.base_tensor);
    if (merge_) apply(factors, +1.0f);
    std::cout << "loaded " << name << ": verdict " << verdict_name(verdict) << ", " << factors.size()
              << " modules, " << report.total_intruders() << " intruder dimensions" << clamped
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

  // Must not throw nor call back into the gate's callback setter (see the header).
  static void log_event(const ig_event *e, void *user_data) {
    const uint64_t n = ++*static_cast<std::atomic<uint64_t> *>(user_data);
    std::cerr << "event " << n << ": " << e->adapter << " " << verdict_name(e->verdict) << ", " << e->intruders
              << " intruders in " << e->modules << " modules, " << e->duration_seconds << " s\n";
  }

  // What the clamp changed: in exact mode each clamped direction adds one to its module's rank.
  std::string clamp_summary(const std::vector<ig::Factors> &original, const std::vector<ig::Factors> &damped) const {
    std::map<std::string, size_t> rank;
    for (const auto &f : original) rank[f.base_tensor] = f.rank;
    size_t directions = 0, modules = 0;
    for (const auto &f : damped) {
      const size_t added = f.rank - rank.at(f.base_tensor);
      directions += added;
      modules += added > 0;
    }
    std::ostringstream s;
    s << "clamped " << directions << " directions in " << modules << " modules (lambda " << lambda_ << ")";
    return s.str();
  }

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

  std::atomic<uint64_t> events_{0};  // declared before gate_: outlives its callback
  ig::Gate gate_;
  double lambda_;
  bool merge_;
  std::map<std::string, Entry> active_;
  std::map<std::string, Weight> merged_;
};

// Closes a file descriptor when it goes out of scope.
struct Fd {
  int fd;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd &) = delete;
  Fd &operator=(const Fd &) = delete;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

// A listening socket on 127.0.0.1:port (0 = any free port).
int listen_on(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  Fd guard(fd);
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (bind(fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) < 0 || listen(fd, 16) < 0)
    throw std::runtime_error("listening on 127.0.0.1:" + std::to_string(port) + ": " + std::strerror(errno));
  guard.fd = -1;
  return fd;
}

uint16_t bound_port(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr *>(&addr), &len);
  return ntohs(addr.sin_port);
}

void send_all(int fd, const std::string &data) {
  for (size_t sent = 0; sent < data.size();) {
    const ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;  // the client went away; nothing to do
    sent += size_t(n);
  }
}

// Answers one HTTP/1.x request on a fresh connection, then closes it. A short receive timeout
// keeps a silent client from stalling the command loop.
void serve_one(int listener, const Registry &registry) {
  Fd conn(accept(listener, nullptr, nullptr));
  if (conn.fd < 0) return;
  const timeval timeout{2, 0};
  setsockopt(conn.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  std::string request;
  char buf[1024];
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 8192) {
    const ssize_t n = recv(conn.fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    request.append(buf, size_t(n));
  }
  std::istringstream line(request.substr(0, request.find("\r\n")));
  std::string method, target;
  line >> method >> target;
  std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8", body;
  if (method != "GET") {
    status = "405 Method Not Allowed", type = "text/plain", body = "only GET\n";
  } else if (target != "/metrics") {
    status = "404 Not Found", type = "text/plain", body = "try /metrics\n";
  } else {
    body = registry.metrics();
  }
  send_all(conn.fd, "HTTP/1.1 " + status + "\r\nContent-Type: " + type + "\r\nContent-Length: " +
                        std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body);
}

void run_command(Registry &registry, const std::string &line) {
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
  std::cout.flush();  // a driver waits for each answer
}

// One thread: poll() waits on stdin and, when serving, the listening socket; stdin is read
// with read() (not std::cin) so no line sits unseen in a stream buffer while poll() waits.
void command_loop(Registry &registry, int listener) {
  std::string pending;
  for (;;) {
    pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {listener, POLLIN, 0}};
    if (poll(fds, listener >= 0 ? 2 : 1, -1) < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string("poll: ") + std::strerror(errno));
    }
    if (listener >= 0 && (fds[1].revents & POLLIN)) serve_one(listener, registry);
    if (!(fds[0].revents & (POLLIN | POLLHUP))) continue;
    char buf[4096];
    const ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    pending.append(buf, size_t(n));
    for (size_t eol; (eol = pending.find('\n')) != std::string::npos; pending.erase(0, eol + 1))
      run_command(registry, pending.substr(0, eol));
  }
  if (!pending.empty()) run_command(registry, pending);  // a last line without '\n'
}

int main(int argc, char **argv) {
  const std::string usage =
      std::string("usage: ") + argv[0] +
      " [--merge] [--metrics-port PORT] [--policy FILE] [--lambda L] BASE  < commands (load NAME DIR | unload NAME | list)\n";
  bool merge = false;
  int port = -1;
  std::string policy_file;
  double lambda = 0.75;  // PEFT's default; the paper found 0.3 to 0.75 keeps task accuracy
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--merge") {
      merge = true;
    } else if (arg == "--metrics-port" && i + 1 < argc) {
      char *end = nullptr;
      const long p = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || p < 0 || p > 65535) {
        std::cerr << usage;
        return 2;
      }
      port = int(p);
    } else if (arg == "--policy" && i + 1 < argc) {
      policy_file = argv[++i];
    } else if (arg == "--lambda" && i + 1 < argc) {
      char *end = nullptr;
      lambda = std::strtod(argv[++i], &end);
      if (*end != '\0' || !std::isfinite(lambda) || lambda < 0) {
        std::cerr << usage;
        return 2;
      }
    } else {
      args.push_back(arg);
    }
  }
  if (args.size() != 1) {
    std::cerr << usage;
    return 2;
  }
  try {
    Registry registry(args[0], policy_file.empty() ? std::string() : ig::read_file(policy_file), lambda, merge);
    Fd listener(port >= 0 ? listen_on(uint16_t(port)) : -1);
    if (listener.fd >= 0)
      std::cerr << "serving metrics on http://127.0.0.1:" << bound_port(listener.fd) << "/metrics" << std::endl;
    command_loop(registry, listener.fd);
  } catch (const std::exception &e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
