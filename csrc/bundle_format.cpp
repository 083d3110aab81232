// bundle_format.cpp: placeholder, being written
#include "bundle_format.h"
