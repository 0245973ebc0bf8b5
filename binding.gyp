{
  "variables": {
    "kernel_sources": [
      "native/cpu/gemm.cpp",
      "native/cpu/gemm_prefill.cpp",
      "native/cpu/norm.cpp",
      "native/cpu/conv1d.cpp",
      "native/cpu/selective_scan.cpp",
      "native/cpu/ssd.cpp",
      "native/cpu/moe.cpp",
      "native/cpu/sampling.cpp",
      "native/cpu/ceilings.cpp",
      "native/cpu/table.cpp",
      "native/train/ops.cpp",
      "native/train/ssd_chunked.cpp"
    ],
    "common_cflags": ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-fexceptions"]
  },
  "target_defaults": {
    "include_dirs": ["native"],
    "cflags!": ["-fno-exceptions", "-O2"],
    "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-O2"],
    "cflags_cc": ["<@(common_cflags)"],
    "conditions": [
      ["target_arch=='x64'", {"defines": ["MSSM_HAVE_X86_LEVELS=1"]}, {"defines": ["MSSM_HAVE_X86_LEVELS=0"]}]
    ]
  },
  "targets": [
    {
      "target_name": "mssm_cpu_baseline",
      "type": "static_library",
      "sources": ["<@(kernel_sources)"],
      "defines": ["MSSM_LEVEL=baseline"]
    },
    {
      "target_name": "mamba_ssm",
      "sources": [
        "native/core/cpu_features.cpp",
        "native/core/threadpool.cpp",
        "native/core/large_alloc.cpp",
        "native/cpu/dispatch.cpp",
        "native/model/mamba_model.cpp",
        "native/train/ops_dispatch.cpp",
        "native/train/linear.cpp",
        "native/train/moe.cpp",
        "native/train/trainer.cpp",
        "native/napi/addon.cpp",
        "native/napi/memory.cpp",
        "native/napi/ops.cpp",
        "native/napi/bench.cpp",
        "native/napi/mapfile.cpp",
        "native/napi/model.cpp",
        "native/napi/train.cpp",
        "native/napi/cuda.cpp"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NAPI_CPP_EXCEPTIONS"],
      "dependencies": ["mssm_cpu_baseline"],
      "libraries": ["-lpthread"],
      "conditions": [
        ["target_arch=='x64'", {"dependencies": ["mssm_cpu_avx2", "mssm_cpu_avx512", "mssm_cpu_avx512bf16"]}]
      ]
    }
  ],
  "conditions": [
    ["target_arch=='x64'", {
      "targets": [
        {
          "target_name": "mssm_cpu_avx2",
          "type": "static_library",
          "sources": ["<@(kernel_sources)"],
          "defines": ["MSSM_LEVEL=avx2"],
          "cflags_cc": ["-mavx2", "-mfma", "-mf16c"]
        },
        {
          "target_name": "mssm_cpu_avx512",
          "type": "static_library",
          "sources": ["<@(kernel_sources)"],
          "defines": ["MSSM_LEVEL=avx512"],
          "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        },
        {
          "target_name": "mssm_cpu_avx512bf16",
          "type": "static_library",
          "sources": ["<@(kernel_sources)"],
          "defines": ["MSSM_LEVEL=avx512bf16"],
          "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                        "-mavx512bf16", "-mavx512vnni"]
        }
      ]
    }]
  ]
}
