// xnn_executor_runner: runs every image of CIFAR-10's test_batch.bin through a .pte and prints
// the accuracy, with the lab's interface and output lines. Preprocessing matches
// mobileprune.data.preprocess: bilinear 32->224 (variant "torchvision": half-pixel centres;
// "runner": source = dest * 32/224), /255, ImageNet mean/std, NCHW float32.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

// The wheel ships libexecutorch_threadpool.so but not threadpool.h: declare the two symbols we
// call, as that header does (the return value is not used, so its type does not matter).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::extension::from_blob;
using executorch::extension::Module;

namespace {
constexpr int kSrc = 32, kDst = 224, kRecord = 3073;
constexpr float kMean[3] = {0.485f, 0.456f, 0.406f}, kStd[3] = {0.229f, 0.224f, 0.225f};

struct Args {
  std::string model = "model/mobilenet.pte", data = "data/test_batch.bin", resize = "torchvision", predictions;
  long limit = -1;
  int threads = 0;
  bool bench = false;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "xnn_executor_runner: error: %s\n", message.c_str());
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(key + " needs a value");
      return argv[++i];
    };
    if (key == "--model_path" || key == "--model-path") a.model = value();
    else if (key == "--data") a.data = value();
    else if (key == "--resize") a.resize = value();
    else if (key == "--limit") a.limit = std::stol(value());
    else if (key == "--threads") a.threads = std::stoi(value());
    else if (key == "--bench") a.bench = true;
    else if (key == "--predictions") a.predictions = value();
    else if (key == "--help" || key == "-h") {
      std::printf("usage: xnn_executor_runner [--model_path model/mobilenet.pte] [--data data/test_batch.bin]\n"
                  "       [--limit N] [--resize torchvision|runner] [--threads N] [--bench] [--predictions FILE]\n");
      std::exit(0);
    } else fail("unknown option " + key);
  }
  if (a.resize != "torchvision" && a.resize != "runner") fail("--resize must be torchvision or runner");
  return a;
}

// One row of the separable bilinear resize: for each destination index, two source taps.
struct Tap { int lo, hi; float w_lo, w_hi; };

std::vector<Tap> taps(const std::string& variant) {
  std::vector<Tap> t(kDst);
  for (int d = 0; d < kDst; ++d) {
    double pos = variant == "torchvision" ? std::max(0.0, (d + 0.5) * kSrc / kDst - 0.5) : double(d) * kSrc / kDst;
    int lo = std::min(int(std::floor(pos)), kSrc - 1), hi = std::min(lo + 1, kSrc - 1);
    float frac = float(pos - lo);
    t[d] = {lo, hi, 1.0f - frac, frac};
  }
  return t;
}

void preprocess(const uint8_t* pixels, const std::vector<Tap>& t, float* out) {
  float rows[kDst * kSrc];
  for (int c = 0; c < 3; ++c) {
    const uint8_t* plane = pixels + c * kSrc * kSrc;
    for (int y = 0; y < kDst; ++y)  // vertical pass: 224 rows of 32
      for (int x = 0; x < kSrc; ++x)
        rows[y * kSrc + x] = t[y].w_lo * plane[t[y].lo * kSrc + x] + t[y].w_hi * plane[t[y].hi * kSrc + x];
    float scale = 1.0f / (255.0f * kStd[c]), shift = kMean[c] / kStd[c];
    for (int y = 0; y < kDst; ++y)  // horizontal pass, then normalise
      for (int x = 0; x < kDst; ++x)
        out[(c * kDst + y) * kDst + x] =
            (t[x].w_lo * rows[y * kSrc + t[x].lo] + t[x].w_hi * rows[y * kSrc + t[x].hi]) * scale - shift;
  }
}
}  // namespace

int main(int argc, char** argv) {
  Args args = parse(argc, argv);
  std::ifstream file(args.data, std::ios::binary | std::ios::ate);
  if (!file) fail(args.data + ": cannot open");
  long size = file.tellg();
  if (size <= 0 || size % kRecord) fail(args.data + ": size " + std::to_string(size) +
                                        " bytes is not a positive multiple of 3073 (truncated?)");
  std::vector<uint8_t> records(size);
  file.seekg(0);
  file.read(reinterpret_cast<char*>(records.data()), size);
  long n = size / kRecord;
  if (args.limit > 0) n = std::min(n, args.limit);

  if (!std::ifstream(args.model)) fail(args.model + ": cannot open");
  if (args.threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(args.threads);
  Module module(args.model);
  if (module.load_method("forward") != executorch::runtime::Error::Ok) fail(args.model + ": cannot load method forward");
  auto meta = module.method_meta("forward");
  if (!meta.ok()) fail(args.model + ": no method forward");
  auto input = meta->input_tensor_meta(0);
  if (!input.ok() || input->sizes().size() != 4 || input->sizes()[0] != 1 || input->sizes()[1] != 3 ||
      input->sizes()[2] != kDst || input->sizes()[3] != kDst)
    fail(args.model + ": input is not 1x3x224x224");

  const auto t = taps(args.resize);
  std::vector<float> image(3 * kDst * kDst);
  std::vector<double> millis;
  long correct = 0;
  std::vector<long> predicted;
  for (long i = 0; i < n; ++i) {
    const uint8_t* record = records.data() + i * kRecord;
    if (record[0] > 9) fail(args.data + ": label " + std::to_string(record[0]) + " of record " + std::to_string(i) +
                            " is outside 0-9");
    preprocess(record + 1, t, image.data());
    auto tensor = from_blob(image.data(), {1, 3, kDst, kDst});
    auto start = std::chrono::steady_clock::now();
    auto result = module.forward(tensor);
    millis.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    if (!result.ok()) fail("inference failed on image " + std::to_string(i));
    const auto& logits = result->at(0).toTensor();
    const float* p = logits.const_data_ptr<float>();
    long best = std::max_element(p, p + logits.numel()) - p;
    correct += best == record[0];
    predicted.push_back(best);
    if ((i + 1) % 1000 == 0 || i + 1 == n) std::printf("Done testing: %ld/%ld\n", i + 1, n);
  }
  if (args.bench && millis.size() > 10) {
    std::vector<double> timed(millis.begin() + 10, millis.end());  // the first ten are warm-up
    std::sort(timed.begin(), timed.end());
    std::printf("Latency: median %.3f ms, p90 %.3f ms per image (%zu images after 10 warm-up)\n",
                timed[timed.size() / 2], timed[timed.size() * 9 / 10], timed.size());
  }
  if (!args.predictions.empty()) {  // one predicted class per line, for comparing with mobileprune
    std::ofstream out(args.predictions);
    for (long p : predicted) out << p << "\n";
  }
  std::printf("Accuracy: %.4f\n", double(correct) / n);
  return 0;
}
