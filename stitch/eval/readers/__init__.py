"""Benchmark readers by family; `stitch.eval.tasks` is the registry that names them (and re-exports the shared
types). `common`: `Sample`, `TaskData`, the prompts, image decoding and the reading helpers every family shares;
`vqa`: VQAv2, TextVQA, RealWorldQA, easy-vqa; `docs`: DocVQA, InfographicVQA, ChartQA, OCRBench;
`multiple_choice`: AI2D, MMMU, MathVista; `captions`: COCO captions."""
