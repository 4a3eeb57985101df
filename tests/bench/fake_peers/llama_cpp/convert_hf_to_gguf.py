import sys

from conversion import write

if __name__ == "__main__":
    write(sys.argv[1:], "base")
