// bundle_writer.cpp: placeholder, being written
