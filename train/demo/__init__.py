"""`loraquilt demo`: datasets written by code (tasks, facts), adapters trained once and
cached (cache), and the command that serves them and shows what composition does (cli)."""
