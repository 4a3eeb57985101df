"""QLoRA fine-tuning on the NF4 base that `loraquilt serve` serves (`loraquilt train`), and
the demo adapters that show what composition does (`loraquilt demo`).

data (JSON lines -> labelled token ids) -> qlora (NF4 model + LoRA) -> loop (training,
eval loss) -> evaluate (task metrics through the engine) -> report (JSON); run ties them
together, cli is the command.
"""
