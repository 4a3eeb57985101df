class LoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        assert lora_int_id > 0
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path
