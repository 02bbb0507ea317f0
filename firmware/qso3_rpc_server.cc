// qso3-rpc-server: the board side of qso3-tvm. A TVM RPC server in C++ that links only the TVM
// runtime (libtvm_runtime.so, libtvm_ffi.so from the apache-tvm / apache-tvm-ffi wheels).
//
// Protocol (TVM 0.27, little-endian int32):
//   client -> server: RPC_MAGIC 0xFF271, len, "client:<key> [-timeout=<s>]"
//   server -> client: RPC_MAGIC + 0 (success) | RPC_MAGIC + 2 (key mismatch), len, "server:<key>"
//   then the socket is handed to the runtime's rpc.ServerLoop.
//   tracker: TRACKER_MAGIC 0x2F271 both ways, then length-prefixed JSON
//   [UPDATE_INFO, {"key": "server:<key>", "addr": [custom_addr, port]}], [PUT, key, [port, matchkey], addr],
//   [GET_PENDING_MATCHKEYS] as a 2 s heartbeat.
//
// Structure: one single-threaded parent that never blocks for long. It polls the listening socket,
// the handshakes in progress (read concurrently, each with a deadline: --handshake-timeout), the
// tracker connection (connected in the background, retried with back-off; direct clients are served
// while the tracker is down) and a self-pipe for signals. One session at a time: a client whose
// handshake is done waits in a queue until the board is free. Each session runs in a forked child:
// a crash (SIGSEGV, SIGILL on a missing CPU feature) ends that session only; the board keeps serving.
// A session timeout (client's -timeout or --timeout) kills the child; a session that receives nothing
// for --idle-timeout seconds ends. SIGTERM/SIGINT: the parent kills its session child and exits.
//
// Sessions are confined to their own directory: tvm.rpc.server.workpath (hence upload, download,
// remove) and tvm.rpc.server.load_module accept plain file names only. qso3.board.load_verified loads
// a library only if its SHA-256 is the one the client names.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace {

constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kTrackerMagic = 0x2F271;
constexpr int kTrackerSuccess = 0, kTrackerPut = 3, kTrackerUpdateInfo = 5, kTrackerPendingKeys = 7;
constexpr int32_t kMaxHeader = 4096;     // longest handshake header accepted
constexpr size_t kMaxConnections = 32;   // handshakes in progress + clients queued for the board
constexpr size_t kMaxLogString = 64;     // longest client-supplied string written to the log
constexpr size_t kMaxLabel = 64;

struct Options {
  std::string host = "127.0.0.1", key = "qso3", work_dir = "/tmp/qso3-rpc", tracker, custom_addr, label = "board";
  int port = 9090, timeout = 0;
  double handshake_timeout = 5, idle_timeout = 600;
  long parent_pid = 0;  // --parent-pid: exit when that process is gone (0: never)
};

double Now() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

void Log(const std::string& msg) {
  std::fprintf(stderr, "[qso3-rpc-server %d] %s\n", static_cast<int>(getpid()), msg.c_str());
  std::fflush(stderr);
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", s);
  return buf;
}

// A client-supplied string as it may appear in the log: printable ASCII only, at most `max` chars.
std::string Printable(const std::string& s, size_t max = kMaxLogString) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > max) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

// At most `burst` messages of one kind per `window` seconds; then one line saying how many were dropped.
class RateLimitedLog {
 public:
  RateLimitedLog(int burst, double window) : burst_(burst), window_(window) {}
  void operator()(const std::string& msg) {
    double now = Now();
    if (now - start_ >= window_) {
      if (suppressed_) Log("(" + std::to_string(suppressed_) + " similar messages suppressed)");
      start_ = now;
      count_ = suppressed_ = 0;
    }
    if (count_++ < burst_) Log(msg);
    else ++suppressed_;
  }

 private:
  int burst_;
  double window_, start_ = -1e18;
  int count_ = 0, suppressed_ = 0;
};

// JSON string literal: quotes, backslashes, control and non-ASCII bytes escaped (output is ASCII).
std::string JsonStr(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// --label: [A-Za-z0-9._-] only (anything else becomes '_'), at most 64 characters.
std::string SanitizeLabel(const std::string& s) {
  std::string out;
  for (char c : s.substr(0, kMaxLabel))
    out += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-') ? c : '_';
  return out.empty() ? "board" : out;
}

bool SendAll(int fd, const void* data, size_t n) {
  auto p = static_cast<const char*>(data);
  while (n) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool RecvAll(int fd, void* data, size_t n) {
  auto p = static_cast<char*>(data);
  while (n) {
    ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool SendInt(int fd, int32_t v) { return SendAll(fd, &v, 4); }  // little-endian hosts only (x86, aarch64)
bool RecvInt(int fd, int32_t* v) { return RecvAll(fd, v, 4); }

bool SendStr(int fd, const std::string& s) {
  return SendInt(fd, static_cast<int32_t>(s.size())) && SendAll(fd, s.data(), s.size());
}

bool RecvStr(int fd, std::string* s, int32_t max_len = 1 << 20) {
  int32_t n;
  if (!RecvInt(fd, &n) || n < 0 || n > max_len) return false;
  s->assign(static_cast<size_t>(n), '\0');
  return RecvAll(fd, s->data(), static_cast<size_t>(n));
}

void SetTimeouts(int fd, double seconds) {  // SO_RCVTIMEO / SO_SNDTIMEO; 0: none
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

void SetNonBlocking(int fd, bool on) {
  int flags = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK));
}

int Listen(const std::string& host, int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    errno = EINVAL;
    return -1;
  }
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 16) != 0) {
    int err = errno;
    close(fd);
    errno = err;
    return -1;
  }
  SetNonBlocking(fd, true);
  return fd;
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return remove(path); }
void RemoveTree(const std::string& dir) { nftw(dir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }

// ---------------------------------------------------------------- SHA-256 (FIPS 180-4)
class Sha256 {
 public:
  void Update(const void* data, size_t n) {
    auto p = static_cast<const uint8_t*>(data);
    total_ += n;
    while (n) {
      size_t k = std::min(n, sizeof(block_) - used_);
      std::memcpy(block_ + used_, p, k);
      used_ += k;
      p += k;
      n -= k;
      if (used_ == sizeof(block_)) {
        Compress(block_);
        used_ = 0;
      }
    }
  }

  std::string HexDigest() {
    uint64_t bits = total_ * 8;
    uint8_t pad = 0x80, zero = 0;
    Update(&pad, 1);
    while (used_ != 56) Update(&zero, 1);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    Update(len, 8);
    std::string hex;
    char buf[9];
    for (uint32_t w : h_) {
      std::snprintf(buf, sizeof(buf), "%08x", w);
      hex += buf;
    }
    return hex;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void Compress(const uint8_t* b) {
    static constexpr uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t{b[4 * i]} << 24) | (uint32_t{b[4 * i + 1]} << 16) | (uint32_t{b[4 * i + 2]} << 8) | b[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b2 = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b2) ^ (a & c) ^ (b2 & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b2;
      b2 = a;
      a = t1 + t2;
    }
    h_[0] += a, h_[1] += b2, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t block_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

bool Sha256File(const std::string& path, std::string* hex) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  Sha256 sha;
  std::vector<char> buf(1 << 16);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) sha.Update(buf.data(), n);
  bool ok = !std::ferror(f);
  std::fclose(f);
  if (ok) *hex = sha.HexDigest();
  return ok;
}

// ---------------------------------------------------------------- tracker client
// Fully non-blocking, driven by the main loop's poll: connect, TRACKER_MAGIC, UPDATE_INFO, PUT, then a
// heartbeat every 2 s and a PUT after each session. A reply more than 5 s late, a refused connection or
// a closed one: drop it and retry after 1, 2, 4 ... 30 s. Direct clients never wait for the tracker.
class Tracker {
 public:
  explicit Tracker(const Options& opt) : opt_(opt) {}

  bool enabled() const { return !opt_.tracker.empty(); }
  int fd() const { return fd_; }
  short events() const { return static_cast<short>(POLLIN | (connecting_ || !out_.empty() ? POLLOUT : 0)); }
  // The match key a tracker client may present (empty before the first registration).
  const std::string& matchkey() const { return matchkey_; }

  // Seconds until Tick() has something to do: a connect attempt, a reply overdue, a heartbeat.
  double NextEvent(double now) const {
    if (!enabled()) return 1e9;
    if (fd_ < 0) return next_attempt_ - now;
    if (connecting_ || !expect_.empty()) return reply_deadline_ - now;
    return registered_ ? next_heartbeat_ - now : 1e9;
  }

  void Tick(double now) {
    if (!enabled()) return;
    if (fd_ < 0) {
      if (now >= next_attempt_) StartConnect(now);
    } else if (connecting_ || !expect_.empty()) {
      if (now >= reply_deadline_) Fail(now, connecting_ ? "connect timed out" : "no answer within 5 s");
    } else if (registered_ && now >= next_heartbeat_) {
      Request(now, kHeartbeat, "[" + std::to_string(kTrackerPendingKeys) + "]");
    }
  }

  void OnEvents(short revents, double now) {
    if (fd_ < 0) return;
    if (connecting_) {
      if (!(revents & (POLLOUT | POLLERR | POLLHUP))) return;
      int err = 0;
      socklen_t len = sizeof(err);
      if (getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)
        return Fail(now, std::strerror(err ? err : errno));
      return Connected(now);
    }
    if (revents & (POLLIN | POLLERR | POLLHUP)) {
      char buf[4096];
      ssize_t n = recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
        return Fail(now, "connection lost");
      if (n > 0) in_.append(buf, static_cast<size_t>(n));
      if (!Parse(now)) return;
    }
    if ((revents & POLLOUT) && fd_ >= 0) Flush(now);
  }

  // After a session of a tracker client (it presented the match key, which the tracker handed out):
  // announce a fresh match key. A direct session leaves the announced one in place.
  void SessionEnded(double now, bool used_matchkey) {
    if (registered_ && used_matchkey) Put(now);
  }

  // Busy (a session, or clients queued for one): a match key the tracker handed out may be in use.
  void SetBusy(bool busy) { busy_ = busy; }

  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    connecting_ = registered_ = false;
    in_.clear();
    out_.clear();
    expect_.clear();  // matchkey_ stays valid until a new one is announced
  }

 private:
  enum Reply { kMagicReply, kStatus, kHeartbeat };

  void StartConnect(double now) {
    auto colon = opt_.tracker.rfind(':');
    addrinfo hints{}, *res = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    if (colon == std::string::npos ||
        getaddrinfo(opt_.tracker.substr(0, colon).c_str(), opt_.tracker.c_str() + colon + 1, &hints, &res) != 0 || !res)
      return Fail(now, "cannot resolve the address");
    fd_ = socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, res->ai_protocol);
    if (fd_ < 0) {
      freeaddrinfo(res);
      return Fail(now, std::strerror(errno));
    }
    int rc = connect(fd_, res->ai_addr, res->ai_addrlen);
    int err = errno;
    freeaddrinfo(res);
    if (rc == 0) return Connected(now);
    if (err != EINPROGRESS) return Fail(now, std::strerror(err));
    connecting_ = true;
    reply_deadline_ = now + 5;
  }

  // The tracker takes the magic alone: the rest waits for its answer (Registered).
  void Connected(double now) {
    connecting_ = false;
    int32_t magic = kTrackerMagic;
    out_.append(reinterpret_cast<const char*>(&magic), 4);
    expect_.push_back(kMagicReply);
    reply_deadline_ = now + 5;
    Flush(now);
  }

  void Register(double now) {
    std::string addr = opt_.custom_addr.empty() ? "null" : JsonStr(opt_.custom_addr);
    Request(now, kStatus, "[" + std::to_string(kTrackerUpdateInfo) + ", {\"key\": " + JsonStr("server:" + opt_.key) +
                              ", \"addr\": [" + addr + ", " + std::to_string(opt_.port) + "]}]");
    Put(now);
  }

  void Put(double now) {
    std::random_device rd;
    matchkey_ = opt_.key + ":" + std::to_string(rd() % 1000000007u);
    std::string addr = opt_.custom_addr.empty() ? "null" : JsonStr(opt_.custom_addr);
    Request(now, kStatus, "[" + std::to_string(kTrackerPut) + ", " + JsonStr(opt_.key) + ", [" +
                              std::to_string(opt_.port) + ", " + JsonStr(matchkey_) + "], " + addr + "]");
  }

  void Request(double now, Reply kind, const std::string& msg) {
    if (expect_.empty()) reply_deadline_ = now + 5;
    int32_t n = static_cast<int32_t>(msg.size());
    out_.append(reinterpret_cast<const char*>(&n), 4);
    out_ += msg;
    expect_.push_back(kind);
    Flush(now);
  }

  void Flush(double now) {
    while (!out_.empty() && fd_ >= 0 && !connecting_) {
      ssize_t n = send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
      if (n <= 0) return Fail(now, "connection lost");
      out_.erase(0, static_cast<size_t>(n));
    }
  }

  // Consume complete replies; false when the connection was dropped.
  bool Parse(double now) {
    while (!expect_.empty()) {
      if (expect_.front() == kMagicReply) {
        if (in_.size() < 4) return true;
        int32_t magic;
        std::memcpy(&magic, in_.data(), 4);
        in_.erase(0, 4);
        if (magic != kTrackerMagic) return Fail(now, "not a TVM tracker"), false;
        expect_.pop_front();
        Register(now);
        if (fd_ < 0) return false;
        continue;
      } else {
        if (in_.size() < 4) return true;
        int32_t n;
        std::memcpy(&n, in_.data(), 4);
        if (n < 0 || n > (1 << 20)) return Fail(now, "bad reply"), false;
        if (in_.size() < 4 + static_cast<size_t>(n)) return true;
        std::string reply = in_.substr(4, static_cast<size_t>(n));
        in_.erase(0, 4 + static_cast<size_t>(n));
        if (expect_.front() == kStatus && std::atoi(reply.c_str()) != kTrackerSuccess)
          return Fail(now, "registration refused: " + Printable(reply)), false;
        if (expect_.front() == kHeartbeat) CheckMatchkeyUsed(now, reply);
      }
      expect_.pop_front();
      reply_deadline_ = now + 5;
      if (expect_.empty() && !registered_) {
        registered_ = true;
        Log("tracker " + opt_.tracker + ": registered" +
            (failures_ ? " after " + std::to_string(failures_) + " failed attempts" : std::string()));
        failures_ = 0;
        backoff_ = 1;
      }
      if (expect_.empty()) next_heartbeat_ = now + 2;
    }
    if (!in_.empty()) return Fail(now, "unexpected data"), false;
    return true;
  }

  // The heartbeat's answer lists our match keys not handed out yet. Ours handed out, but no client came
  // with it for 10 s while the board was free: announce a new one, or the board leaves the pool for good.
  void CheckMatchkeyUsed(double now, const std::string& pending) {
    if (busy_ || matchkey_.empty() || pending.find(JsonStr(matchkey_)) != std::string::npos) {
      unmatched_since_ = 0;
    } else if (unmatched_since_ == 0) {
      unmatched_since_ = now;
    } else if (now - unmatched_since_ >= 10) {
      Log("tracker " + opt_.tracker + ": match key handed out but unused for 10 s; announcing a new one");
      unmatched_since_ = 0;
      Put(now);
    }
  }

  void Fail(double now, const std::string& why) {
    Close();
    // the first failures, then about once per back-off period (at most every 30 s)
    if (failures_++ < 3 || backoff_ >= 30)
      Log("tracker " + opt_.tracker + ": " + why + "; direct connections are still served, retrying in " +
          std::to_string(static_cast<int>(backoff_)) + " s");
    next_attempt_ = now + backoff_;
    backoff_ = std::min(backoff_ * 2, 30.0);
  }

  const Options& opt_;
  int fd_ = -1;
  bool connecting_ = false, registered_ = false, busy_ = false;
  double unmatched_since_ = 0, reply_deadline_ = 0, next_attempt_ = 0, next_heartbeat_ = 0, backoff_ = 1;
  int failures_ = 0;
  std::string in_, out_, matchkey_;
  std::deque<Reply> expect_;
};

// ---------------------------------------------------------------- one session (in a forked child)
// What the profiler checks an artifact against: ISA and the CPU features the kernel reports.
std::string g_label;  // --label (sanitized): how the board describes itself (e.g. emulated-qemu-cortex-a76)
std::string g_cuda = "absent";  // CUDA runtime: "loaded", "absent" (no lib/libtvm_runtime_cuda.so) or the load error

// The CUDA device API and module loader live in libtvm_runtime_cuda.so (beside libtvm_runtime.so in
// lib/). Loaded per session, after fork: CUDA must not be initialised in the parent. Artifacts carry
// precompiled device code (fatbin), so no CUDA compiler is needed here, only the driver and libcudart.
std::string LoadCudaRuntime() {
  char exe[PATH_MAX] = {0};
  if (readlink("/proc/self/exe", exe, sizeof(exe) - 1) <= 0) return "absent";
  std::string lib = std::string(exe).substr(0, std::string(exe).rfind('/')) + "/lib/libtvm_runtime_cuda.so";
  if (access(lib.c_str(), R_OK) != 0) return "absent";
  if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) return "loaded";
  return std::string("error: ") + dlerror();
}

// At start-up, in a throwaway child (the parent never loads CUDA): can sessions load the CUDA runtime?
std::string ProbeCudaRuntime() {
  int fds[2];
  if (pipe(fds) != 0) return "absent";
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string result = LoadCudaRuntime();
    ssize_t ignored = write(fds[1], result.data(), result.size());
    (void)ignored;
    _exit(0);
  }
  close(fds[1]);
  std::string result;
  char buf[512];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof(buf))) > 0) result.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  waitpid(pid, nullptr, 0);
  return result.empty() ? "absent" : result;
}

std::string BoardInfo() {
  utsname u{};
  uname(&u);
  std::vector<std::string> features;
#if defined(__aarch64__)
  unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  const std::pair<unsigned long, const char*> bits[] = {{1ul << 1, "asimd"}, {1ul << 20, "asimddp"}, {1ul << 22, "sve"}};
  for (auto& [bit, name] : bits)
    if (hw & bit) features.push_back(name);
  if (hw2 & (1ul << 13)) features.push_back("i8mm");
#else
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  char line[8192];
  while (f && std::fgets(line, sizeof(line), f)) {
    if (std::strncmp(line, "flags", 5) != 0) continue;
    std::istringstream words(std::strchr(line, ':') + 1);
    std::string w;
    while (words >> w) features.push_back(w);
    break;
  }
  if (f) std::fclose(f);
#endif
  std::string json = "{\"label\": " + JsonStr(g_label) + ", \"machine\": " + JsonStr(u.machine) + ", \"features\": [";
  for (size_t i = 0; i < features.size(); ++i) json += (i ? ", " : "") + JsonStr(features[i]);
  return json + "], \"cuda_runtime\": " + JsonStr(g_cuda) + ", \"load_verified\": true}";
}

// A path inside the session directory for a client-supplied name: a plain file name only (no '/',
// no '..', not absolute, not empty). `allow_empty`: "" names the session directory itself (TVM's RPC
// runner cleans up with remove("")). Anything else is a ValueError the client sees.
std::string SessionPath(const std::string& work_dir, const std::string& name, bool allow_empty) {
  if (name.empty() && allow_empty) return work_dir;
  if (name.empty() || name.find('/') != std::string::npos || name.find("..") != std::string::npos ||
      name.find('\0') != std::string::npos || name == ".")
    TVM_FFI_THROW(ValueError) << "refused path '" << Printable(name) << "'"
                              << ": the board accepts plain file names in the session directory only";
  return work_dir + "/" + name;
}

void RegisterServerFunctions(const std::string& work_dir) {
  namespace ffi = tvm::ffi;
  // tvm.rpc.server.upload / download / remove (in the runtime) resolve names through workpath
  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped([work_dir](ffi::String path) {
                             return ffi::String(SessionPath(work_dir, std::string(path), true));
                           }),
                           true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped([work_dir](ffi::String name) {
                             return ffi::Module::LoadFromFile(ffi::String(SessionPath(work_dir, std::string(name), false)));
                           }),
                           true);
  ffi::Function::SetGlobal(
      "qso3.board.load_verified", ffi::Function::FromTyped([work_dir](ffi::String name, ffi::String sha256_hex) {
        std::string path = SessionPath(work_dir, std::string(name), false), want = std::string(sha256_hex), got;
        std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
        if (want.size() != 64 || want.find_first_not_of("0123456789abcdef") != std::string::npos)
          TVM_FFI_THROW(ValueError) << "load_verified needs a SHA-256 as 64 hex digits, not " << "'" << Printable(want) << "'";
        if (!Sha256File(path, &got))
          TVM_FFI_THROW(ValueError) << "load_verified: cannot read " << std::string(name) << ": " << std::strerror(errno);
        if (got != want)
          TVM_FFI_THROW(ValueError) << "load_verified: SHA-256 mismatch for " << std::string(name) << ": the board has "
                                    << got << ", the client expects " << want << "; not loaded";
        return ffi::Module::LoadFromFile(ffi::String(path));
      }),
      true);
  ffi::Function::SetGlobal("qso3.board.info", ffi::Function::FromTyped([]() -> ffi::String { return ffi::String(BoardInfo()); }), true);
}

[[noreturn]] void ServeSession(int conn, const std::string& work_dir, int timeout, double idle_timeout, pid_t parent) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // the board process gone (even by SIGKILL): the session goes too
  if (getppid() != parent) _exit(1);
  if (timeout > 0) alarm(static_cast<unsigned>(timeout));  // SIGALRM ends the session
  if (mkdir(work_dir.c_str(), 0700) != 0) {
    Log("cannot create the session directory " + work_dir + ": " + std::strerror(errno));
    _exit(1);
  }
  if (g_cuda == "loaded") g_cuda = LoadCudaRuntime();
  RegisterServerFunctions(work_dir);
  int one = 1;
  setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // The server only receives while it waits for the client's next request (a long computation is not
  // idling): nothing for idle_timeout seconds ends the session. The send timeout keeps a client that
  // stops reading a reply from holding the board.
  SetNonBlocking(conn, false);
  SetTimeouts(conn, idle_timeout);
  try {
    tvm::ffi::Function::GetGlobalRequired("rpc.ServerLoop")(conn);
  } catch (const std::exception& e) {
    std::string what = e.what();
    bool idle = what.find("Resource temporarily unavailable") != std::string::npos ||
                what.find("timed out") != std::string::npos;
    Log(idle ? "session idle for " + Seconds(idle_timeout) + ": ended"
             : "session ended: " + Printable(what.substr(what.rfind('\n', what.size() - 2) + 1), 200));
  }
  _exit(0);
}

// ---------------------------------------------------------------- the parent: accept, handshake, sessions
struct Client {
  int fd = -1;
  double deadline = 0;  // handshake deadline
  std::string buf;     // handshake bytes read so far: magic, length, header
  bool ready = false;  // handshake complete and accepted: waits for the board
  bool matchkey = false;  // came with the tracker's match key (not the plain key)
  int timeout = 0;     // session timeout the client asked for
};

int g_signal_pipe[2] = {-1, -1};
volatile sig_atomic_t g_stop = 0;

void OnSignal(int sig) {
  int saved = errno;
  if (sig != SIGCHLD) g_stop = sig;
  char c = static_cast<char>(sig);
  ssize_t ignored = write(g_signal_pipe[1], &c, 1);
  (void)ignored;
  errno = saved;
}

class Server {
 public:
  Server(const Options& opt, int listen_fd) : opt_(opt), listen_fd_(listen_fd), tracker_(opt) {}

  int Run() {
    for (int session = 0; !g_stop;) {
      double now = Now();
      Reap(now);
      if (opt_.parent_pid > 0 && getppid() != static_cast<pid_t>(opt_.parent_pid)) {
        Log("parent process " + std::to_string(opt_.parent_pid) + " is gone: stopping");
        break;
      }
      if (child_ == 0) session += StartNextSession(session);
      tracker_.SetBusy(child_ != 0 || std::any_of(clients_.begin(), clients_.end(), [](const Client& c) { return c.ready; }));
      tracker_.Tick(now);
      ExpireHandshakes(now);

      std::vector<pollfd> fds{{g_signal_pipe[0], POLLIN, 0}};
      bool accepting = clients_.size() < kMaxConnections || FindOldestPending() != clients_.end();
      if (accepting) fds.push_back({listen_fd_, POLLIN, 0});
      size_t first_client = fds.size();
      for (auto& c : clients_)
        if (!c.ready) fds.push_back({c.fd, POLLIN, 0});
      size_t tracker_idx = fds.size();
      if (tracker_.fd() >= 0) fds.push_back({tracker_.fd(), tracker_.events(), 0});

      double wait = std::min(1.0, tracker_.NextEvent(now));  // 1 s: parent check, child reaping fallback
      for (auto& c : clients_)
        if (!c.ready) wait = std::min(wait, c.deadline - now);
      int wait_ms = std::max(0, static_cast<int>(wait * 1000) + 1);
      if (poll(fds.data(), fds.size(), wait_ms) < 0) continue;  // EINTR: a signal, handled above

      now = Now();
      if (fds[0].revents) {
        char buf[64];
        while (read(g_signal_pipe[0], buf, sizeof(buf)) > 0) {
        }
      }
      if (tracker_idx < fds.size() && fds[tracker_idx].revents) tracker_.OnEvents(fds[tracker_idx].revents, now);
      std::vector<int> readable;
      for (size_t i = first_client; i < tracker_idx; ++i)
        if (fds[i].revents) readable.push_back(fds[i].fd);
      for (int fd : readable) ReadHandshake(fd);
      if (accepting && fds[1].revents) Accept(now);
    }
    Shutdown();
    return 0;
  }

 private:
  void Accept(double now) {
    for (;;) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;  // EAGAIN: no more
      if (clients_.size() >= kMaxConnections) {
        auto oldest = FindOldestPending();
        if (oldest == clients_.end()) {
          close(fd);
          return;
        }
        dropped_("too many connections: dropped the oldest unfinished handshake");
        Drop(oldest);
      }
      Client c;
      c.fd = fd;
      c.deadline = now + opt_.handshake_timeout;
      clients_.push_back(c);
    }
  }

  std::deque<Client>::iterator FindOldestPending() {
    return std::find_if(clients_.begin(), clients_.end(), [](const Client& c) { return !c.ready; });
  }

  void Drop(std::deque<Client>::iterator it) {
    close(it->fd);
    clients_.erase(it);
  }

  void ExpireHandshakes(double now) {
    for (auto it = clients_.begin(); it != clients_.end();) {
      if (!it->ready && now >= it->deadline) {
        dropped_("handshake not finished within " + Seconds(opt_.handshake_timeout) + ": connection dropped");
        close(it->fd);
        it = clients_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Read what the client sent so far, never past its header (the RPC stream that follows is the session's).
  void ReadHandshake(int fd) {
    auto it = std::find_if(clients_.begin(), clients_.end(), [fd](const Client& c) { return c.fd == fd; });
    if (it == clients_.end()) return;
    Client& c = *it;
    size_t want = 8;
    if (c.buf.size() >= 8) {
      int32_t len;
      std::memcpy(&len, c.buf.data() + 4, 4);
      want = 8 + static_cast<size_t>(len);
    }
    char buf[kMaxHeader + 8];  // want <= 8 + kMaxHeader: the length was checked when the first 8 bytes came
    ssize_t n = recv(fd, buf, std::min(sizeof(buf), want - c.buf.size()), 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0) return Drop(it);
    c.buf.append(buf, static_cast<size_t>(n));
    if (c.buf.size() >= 4) {
      int32_t magic;
      std::memcpy(&magic, c.buf.data(), 4);
      if (magic != kRPCMagic) {
        dropped_("not a TVM RPC client (bad magic): connection dropped");
        return Drop(it);
      }
    }
    if (c.buf.size() < 8) return;
    int32_t len;
    std::memcpy(&len, c.buf.data() + 4, 4);
    if (len < 0 || len > kMaxHeader) {
      dropped_("handshake header of " + std::to_string(len) + " bytes: connection dropped");
      return Drop(it);
    }
    if (c.buf.size() < 8 + static_cast<size_t>(len)) return;
    std::istringstream words(c.buf.substr(8));
    std::string first, word;
    words >> first;
    // The plain key is always accepted (direct connections, tracker or not); the tracker's match key
    // while registered.
    c.matchkey = !tracker_.matchkey().empty() && first == "client:" + tracker_.matchkey();
    if (!c.matchkey && first != "client:" + opt_.key) {
      SendInt(fd, kRPCMagic + 2);  // a few bytes into an empty socket buffer: does not block
      mismatch_("key mismatch: " + Printable(first));
      return Drop(it);
    }
    while (words >> word)
      if (word.rfind("-timeout=", 0) == 0) c.timeout = std::atoi(word.c_str() + 9);
    c.ready = true;
  }

  // The first queued client whose reply goes through gets the board; returns 1 if a session started.
  int StartNextSession(int session) {
    while (true) {
      auto it = std::find_if(clients_.begin(), clients_.end(), [](const Client& c) { return c.ready; });
      if (it == clients_.end()) return 0;
      Client c = *it;
      clients_.erase(it);
      SetNonBlocking(c.fd, false);
      SetTimeouts(c.fd, opt_.handshake_timeout);
      if (!SendInt(c.fd, kRPCMagic) || !SendStr(c.fd, "server:" + opt_.key)) {
        close(c.fd);
        continue;  // the client left while it waited
      }
      int timeout = c.timeout;
      if (opt_.timeout > 0 && (timeout <= 0 || timeout > opt_.timeout)) timeout = opt_.timeout;
      session_dir_ = opt_.work_dir + "/session-" + std::to_string(getpid()) + "-" + std::to_string(session);
      pid_t parent = getpid();
      pid_t child = fork();
      if (child == 0) {
        CloseAllBut(c.fd);
        ServeSession(c.fd, session_dir_, timeout, opt_.idle_timeout, parent);
      }
      close(c.fd);
      if (child < 0) {
        Log(std::string("cannot fork a session: ") + std::strerror(errno));
        return 0;
      }
      child_ = child;
      session_ = session;
      session_matchkey_ = c.matchkey;
      return 1;
    }
  }

  // In the session child: the parent's sockets and signal handling are not the session's.
  void CloseAllBut(int conn) {
    for (auto& c : clients_)
      if (c.fd != conn) close(c.fd);
    close(listen_fd_);
    tracker_.Close();
    close(g_signal_pipe[0]);
    close(g_signal_pipe[1]);
    for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGCHLD}) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
  }

  void Reap(double now) {
    if (child_ == 0) return;
    int status = 0;
    pid_t r = waitpid(child_, &status, WNOHANG);
    if (r == 0 || (r < 0 && errno == EINTR)) return;
    if (r > 0 && WIFSIGNALED(status))
      Log("session " + std::to_string(session_) + " ended by signal " + std::to_string(WTERMSIG(status)));
    child_ = 0;
    RemoveTree(session_dir_);
    tracker_.SessionEnded(now, session_matchkey_);
  }

  void Shutdown() {
    if (child_ > 0) {
      Log("stopping: ending session " + std::to_string(session_));
      kill(child_, SIGKILL);
      while (waitpid(child_, nullptr, 0) < 0 && errno == EINTR) {
      }
      RemoveTree(session_dir_);
      child_ = 0;
    }
    for (auto& c : clients_) close(c.fd);
    clients_.clear();
    tracker_.Close();
    close(listen_fd_);
    Log(g_stop ? "stopped by signal " + std::to_string(static_cast<int>(g_stop)) : "stopped");
  }

  const Options& opt_;
  int listen_fd_;
  Tracker tracker_;
  std::deque<Client> clients_;
  pid_t child_ = 0;
  int session_ = 0;
  bool session_matchkey_ = false;
  std::string session_dir_;
  RateLimitedLog mismatch_{5, 60}, dropped_{5, 60};
};

int Usage() {
  std::fprintf(stderr,
               "usage: qso3-rpc-server [--host H] [--port P] [--key K] [--work-dir D] [--tracker H:P]\n"
               "                       [--custom-addr A] [--timeout S] [--label L] [--handshake-timeout S]\n"
               "                       [--idle-timeout S] [--parent-pid PID]\n"
               "  --host H               listen address (default 127.0.0.1, loopback only; see README)\n"
               "  --timeout S            longest session, seconds (default 0: none)\n"
               "  --handshake-timeout S  drop a client that has not finished its handshake (default 5)\n"
               "  --idle-timeout S       end a session that receives nothing for S seconds (default 600; 0: never)\n"
               "  --parent-pid PID       exit when process PID is no longer the parent\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) return Usage();
    std::string v = argv[++i];
    if (a == "--host") opt.host = v;
    else if (a == "--port") opt.port = std::atoi(v.c_str());
    else if (a == "--key") opt.key = v;
    else if (a == "--work-dir") opt.work_dir = v;
    else if (a == "--tracker") opt.tracker = v;
    else if (a == "--custom-addr") opt.custom_addr = v;
    else if (a == "--timeout") opt.timeout = std::atoi(v.c_str());
    else if (a == "--label") opt.label = v;
    else if (a == "--handshake-timeout") opt.handshake_timeout = std::atof(v.c_str());
    else if (a == "--idle-timeout") opt.idle_timeout = std::atof(v.c_str());
    else if (a == "--parent-pid") opt.parent_pid = std::atol(v.c_str());
    else return Usage();
  }
  if (opt.handshake_timeout <= 0) opt.handshake_timeout = 5;
  if (opt.idle_timeout < 0) opt.idle_timeout = 0;
  g_label = SanitizeLabel(opt.label);
  signal(SIGPIPE, SIG_IGN);
  g_cuda = ProbeCudaRuntime();
  if (g_cuda != "loaded" && g_cuda != "absent") Log("CUDA runtime not loadable, serving CPU only: " + g_cuda);
  int listen_fd = Listen(opt.host, opt.port);
  if (listen_fd < 0) {
    Log("cannot listen on " + opt.host + ":" + std::to_string(opt.port) + ": " + std::strerror(errno));
    return 1;
  }
  mkdir(opt.work_dir.c_str(), 0700);
  if (pipe2(g_signal_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
    Log(std::string("cannot create the signal pipe: ") + std::strerror(errno));
    return 1;
  }
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: poll returns on a signal
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGCHLD}) sigaction(sig, &sa, nullptr);
  std::printf("qso3-rpc-server listening on %s:%d key=%s%s\n", opt.host.c_str(), opt.port, opt.key.c_str(),
              opt.tracker.empty() ? "" : (" tracker=" + opt.tracker).c_str());
  std::fflush(stdout);
  return Server(opt, listen_fd).Run();
}
