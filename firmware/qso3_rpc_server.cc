// qso3-rpc-server: the board side of qso3-tvm. A TVM RPC server in C++ that links only the TVM
// runtime (libtvm_runtime.so, libtvm_ffi.so from the apache-tvm / apache-tvm-ffi wheels).
//
// Protocol (TVM 0.27, little-endian int32):
//   client -> server: RPC_MAGIC 0xFF271, len, "client:<key> [-timeout=<s>]"
//   server -> client: RPC_MAGIC + 0 (success) | RPC_MAGIC + 2 (key mismatch), len, "server:<key>"
//   then the socket is handed to the runtime's rpc.ServerLoop.
//   tracker: TRACKER_MAGIC 0x2F271 both ways, then length-prefixed JSON
//   [UPDATE_INFO, {"key": "server:<key>", "addr": [custom_addr, port]}], [PUT, key, [port, matchkey], addr],
//   [GET_PENDING_MATCHKEYS] as a 2 s heartbeat while idle.
// One forked child per session: a crash (SIGSEGV, SIGILL on a missing CPU feature) ends that session
// only; the board keeps serving. A session timeout (client's -timeout or --timeout) kills the child.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace {

constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kTrackerMagic = 0x2F271;
constexpr int kTrackerSuccess = 0, kTrackerPut = 3, kTrackerUpdateInfo = 5, kTrackerPendingKeys = 7;

struct Options {
  std::string host = "0.0.0.0", key = "qso3", work_dir = "/tmp/qso3-rpc", tracker, custom_addr, label = "board";
  int port = 9090, timeout = 0;
};

void Log(const std::string& msg) {
  std::fprintf(stderr, "[qso3-rpc-server %d] %s\n", static_cast<int>(getpid()), msg.c_str());
  std::fflush(stderr);
}

bool SendAll(int fd, const void* data, size_t n) {
  auto p = static_cast<const char*>(data);
  while (n) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
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

int Connect(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    if (fd >= 0) close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

int Listen(const std::string& host, int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) return -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 8) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string JsonStr(const std::string& s) { return "\"" + s + "\""; }  // keys/addresses: no escapes needed

// ---------------------------------------------------------------- tracker client
class Tracker {
 public:
  Tracker(const Options& opt, int port) : opt_(opt), port_(port) {}

  bool Connect() {
    auto colon = opt_.tracker.rfind(':');
    if (colon == std::string::npos) return false;
    fd_ = ::Connect(opt_.tracker.substr(0, colon), std::atoi(opt_.tracker.c_str() + colon + 1));
    int32_t magic = 0;
    if (fd_ < 0 || !SendInt(fd_, kTrackerMagic) || !RecvInt(fd_, &magic) || magic != kTrackerMagic) return Fail();
    std::string addr = opt_.custom_addr.empty() ? "null" : JsonStr(opt_.custom_addr);
    std::string info = "[" + std::to_string(kTrackerUpdateInfo) + ", {\"key\": " + JsonStr("server:" + opt_.key) +
                       ", \"addr\": [" + addr + ", " + std::to_string(port_) + "]}]";
    return Call(info) && Put();
  }

  // Announce a fresh match key: the tracker hands it to one client.
  bool Put() {
    std::random_device rd;
    matchkey_ = opt_.key + ":" + std::to_string(rd() % 1000000007u);
    std::string addr = opt_.custom_addr.empty() ? "null" : JsonStr(opt_.custom_addr);
    return Call("[" + std::to_string(kTrackerPut) + ", " + JsonStr(opt_.key) + ", [" + std::to_string(port_) + ", " +
                JsonStr(matchkey_) + "], " + addr + "]");
  }

  bool Heartbeat() {
    std::string reply;
    return SendStr(fd_, "[" + std::to_string(kTrackerPendingKeys) + "]") && RecvStr(fd_, &reply);
  }

  bool connected() const { return fd_ >= 0; }
  const std::string& matchkey() const { return matchkey_; }

 private:
  bool Call(const std::string& msg) {
    std::string reply;
    if (!SendStr(fd_, msg) || !RecvStr(fd_, &reply) || std::atoi(reply.c_str()) != kTrackerSuccess) return Fail();
    return true;
  }
  bool Fail() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    return false;
  }
  const Options& opt_;
  int port_, fd_ = -1;
  std::string matchkey_;
};

// ---------------------------------------------------------------- one session (in a forked child)
// What the profiler checks an artifact against: ISA and the CPU features the kernel reports.
std::string g_label;  // --label: how the board describes itself (e.g. emulated-qemu-cortex-a76)
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
  return json + "], \"cuda_runtime\": " + JsonStr(g_cuda) + "}";
}

void RegisterServerFunctions(const std::string& work_dir) {
  namespace ffi = tvm::ffi;
  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped([work_dir](ffi::String path) {
                             return ffi::String(work_dir + "/" + std::string(path));
                           }),
                           true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped([work_dir](ffi::String name) {
                             return ffi::Module::LoadFromFile(ffi::String(work_dir + "/" + std::string(name)));
                           }),
                           true);
  ffi::Function::SetGlobal("qso3.board.info", ffi::Function::FromTyped([]() -> ffi::String { return ffi::String(BoardInfo()); }), true);
}

[[noreturn]] void ServeSession(int conn, const std::string& work_dir, int timeout) {
  if (timeout > 0) alarm(static_cast<unsigned>(timeout));  // SIGALRM ends the session
  mkdir(work_dir.c_str(), 0700);
  if (g_cuda == "loaded") g_cuda = LoadCudaRuntime();
  RegisterServerFunctions(work_dir);
  int one = 1;
  setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  tvm::ffi::Function::GetGlobalRequired("rpc.ServerLoop")(conn);
  _exit(0);
}

// Handshake; returns the session timeout the client asked for (0: none), or -1 to drop the connection.
int Handshake(int conn, const Options& opt, const std::string& matchkey) {
  int32_t magic = 0;
  std::string header;
  if (!RecvInt(conn, &magic) || magic != kRPCMagic || !RecvStr(conn, &header, 4096)) return -1;
  std::istringstream words(header);
  std::string first, word;
  words >> first;
  if (first != "client:" + matchkey) {
    SendInt(conn, kRPCMagic + 2);
    Log("key mismatch: " + first);
    return -1;
  }
  int timeout = 0;
  while (words >> word)
    if (word.rfind("-timeout=", 0) == 0) timeout = std::atoi(word.c_str() + 9);
  if (!SendInt(conn, kRPCMagic) || !SendStr(conn, "server:" + opt.key)) return -1;
  return timeout;
}

void RemoveTree(const std::string& dir) { std::system(("rm -rf '" + dir + "'").c_str()); }

int Usage() {
  std::fprintf(stderr,
               "usage: qso3-rpc-server [--host H] [--port P] [--key K] [--work-dir D] [--tracker H:P]\n"
               "                       [--custom-addr A] [--timeout S] [--label L]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--host") opt.host = next();
    else if (a == "--port") opt.port = std::atoi(next().c_str());
    else if (a == "--key") opt.key = next();
    else if (a == "--work-dir") opt.work_dir = next();
    else if (a == "--tracker") opt.tracker = next();
    else if (a == "--custom-addr") opt.custom_addr = next();
    else if (a == "--timeout") opt.timeout = std::atoi(next().c_str());
    else if (a == "--label") opt.label = next();
    else return Usage();
  }
  g_label = opt.label;
  signal(SIGPIPE, SIG_IGN);
  g_cuda = ProbeCudaRuntime();
  if (g_cuda != "loaded" && g_cuda != "absent") Log("CUDA runtime not loadable, serving CPU only: " + g_cuda);
  int listen_fd = Listen(opt.host, opt.port);
  if (listen_fd < 0) {
    Log("cannot listen on " + opt.host + ":" + std::to_string(opt.port) + ": " + std::strerror(errno));
    return 1;
  }
  mkdir(opt.work_dir.c_str(), 0700);
  Tracker tracker(opt, opt.port);
  std::printf("qso3-rpc-server listening on %s:%d key=%s%s\n", opt.host.c_str(), opt.port, opt.key.c_str(),
              opt.tracker.empty() ? "" : (" tracker=" + opt.tracker).c_str());
  std::fflush(stdout);
  for (int session = 0;; ++session) {
    if (!opt.tracker.empty() && !tracker.connected() && !tracker.Connect()) {
      Log("tracker " + opt.tracker + " unreachable, retrying");
      sleep(1);
      continue;
    }
    pollfd pfd{listen_fd, POLLIN, 0};
    if (poll(&pfd, 1, 2000) == 0) {  // idle: heartbeat to the tracker
      if (tracker.connected() && !tracker.Heartbeat()) Log("tracker connection lost");
      continue;
    }
    int conn = accept(listen_fd, nullptr, nullptr);
    if (conn < 0) continue;
    std::string matchkey = opt.tracker.empty() ? opt.key : tracker.matchkey();
    int timeout = Handshake(conn, opt, matchkey);
    if (timeout < 0) {
      close(conn);
      continue;
    }
    if (opt.timeout > 0 && (timeout == 0 || timeout > opt.timeout)) timeout = opt.timeout;
    std::string work = opt.work_dir + "/session-" + std::to_string(getpid()) + "-" + std::to_string(session);
    pid_t child = fork();
    if (child == 0) {
      close(listen_fd);
      ServeSession(conn, work, timeout);
    }
    close(conn);
    int status = 0;
    waitpid(child, &status, 0);
    if (WIFSIGNALED(status)) Log("session " + std::to_string(session) + " ended by signal " + std::to_string(WTERMSIG(status)));
    RemoveTree(work);
    if (tracker.connected() && !tracker.Put()) Log("tracker connection lost");
  }
}
