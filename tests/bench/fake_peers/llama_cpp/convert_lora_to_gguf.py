import sys

from conversion import write

if __name__ == "__main__":
    if "fail" in sys.argv[-1]:
        sys.exit(1)
    write(sys.argv[1:], "lora")
