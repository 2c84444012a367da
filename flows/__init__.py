"""Prefect 3 flows: `pipeline` (all stages), `stage` (one stage), `lora` (LoRA refresh), `deploy`.

Flows only sequence stages and pass paths; the work happens in `stages/`. See docs/deploy.md.
"""
