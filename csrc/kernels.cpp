// kernels.cpp: placeholder, being written
