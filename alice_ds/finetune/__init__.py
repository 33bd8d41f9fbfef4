"""Does pretraining help? Supervised fine-tuning of MONAI `SwinUNETR` from alice-ds weights (or from
scratch), its evaluation (Dice, HD95, overlay pictures) and curves of any run's `metrics.jsonl`.

Modules: `data` (cases, classes, preprocessing, MONAI transforms), `config` (`FinetuneConfig`),
`checkpoint` (the run's files), `metrics` (Dice, HD95, sliding-window prediction), `train`
(`alice-ds finetune`, Accelerate), `evaluate` (`alice-ds evaluate`), `pictures` (overlays), `plot`
(`alice-ds plot`). Nothing here imports the DeepSpeed engine: weights come in through
`alice_ds.export.load_pretrained`.
"""
