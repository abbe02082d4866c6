"""Stand-in for `npu-smi info` on a 310P card: the table layout the real tool prints."""

import os
import sys

CHIP = os.environ.get("STANDIN_NPU_CHIP", "310P3")  # what deployed Atlas 300I Pro/Duo cards report

if sys.argv[1:] != ["info"]:
    print("usage: npu-smi info", file=sys.stderr)
    sys.exit(1)
print(f"""+--------------------------------------------------------------------------------------------------------+
| npu-smi 23.0.0                                   Version: 23.0.0                                       |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 0       {CHIP}                 | OK              | NA           44                0     / 0             |
| 0       0                     | 0000:01:00.0    | 0            1782 / 21527                            |
+===============================+=================+======================================================+""")
